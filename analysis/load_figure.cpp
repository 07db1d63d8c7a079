#include "analysis/load_figure.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.hpp"

namespace moelab::analysis {
namespace {

// Colour-blind-safe qualitative palette (Okabe & Ito), then greys for further domains.
const char* colour(size_t i) {
  static const char* palette[] = {"#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"};
  return i < std::size(palette) ? palette[i] : "#999999";
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

}  // namespace

std::string expert_load_by_domain_svg(const StatsReport& r) {
  if (r.domains.empty()) throw Error("expert load figure: the statistics were not computed by domain");
  const size_t domains = r.domains.size(), experts = size_t(r.num_experts), layers = size_t(r.num_layers);
  double top = 1.0 / double(r.num_experts);
  for (const auto& d : r.domains)
    for (const auto& l : d.layers) top = std::max(top, *std::max_element(l.load_share.begin(), l.load_share.end()));
  const double bar_w = 6, group_gap = 8, left = 50, panel_h = top * kLoadFigureBarScale + 40;
  const double group_w = double(domains) * bar_w + group_gap, panel_w = left + double(experts) * group_w + 10;
  const double legend_h = 18.0 * double(domains) + 10, height = double(layers) * panel_h + legend_h + 30;
  const std::string title = fmt::format("Expert load by domain: share of each domain's top-{} choices (dashed: "
                                        "uniform 1/{})", r.top_k, r.num_experts);
  // Wide enough for the title: sans-serif at 13 px averages under 0.62 em per character.
  const double width = std::max(panel_w, 20 + 0.62 * 13 * double(title.size()));
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" font-family=\"sans-serif\" "
      "font-size=\"11\">\n<text x=\"10\" y=\"16\" font-size=\"13\">{}</text>\n",
      width, height, escape(title));
  // The y axis: a tick and its share every 5% (10% when the tallest bar passes 25%).
  const double step = top > 0.25 ? 0.10 : 0.05;
  for (size_t l = 0; l < layers; ++l) {
    const double y0 = 30 + double(l) * panel_h, base = y0 + top * kLoadFigureBarScale + 10;
    svg += fmt::format("<g class=\"layer\" data-layer=\"{}\">\n<text x=\"{:.1f}\" y=\"{:.1f}\">layer {}</text>\n", l,
                       left + 4, y0 + 8, l);
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#444\"/>\n", left, base,
                       panel_w - 10, base);
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#444\"/>\n", left, base,
                       left, base - top * kLoadFigureBarScale);
    for (int t = 0; double(t) * step <= top + 1e-9; ++t) {
      const double v = double(t) * step, y = base - v * kLoadFigureBarScale;
      svg += fmt::format("<line class=\"tick\" x1=\"{:.1f}\" y1=\"{:.2f}\" x2=\"{:.1f}\" y2=\"{:.2f}\" stroke=\"#444\"/>"
                         "<text class=\"tick-label\" data-share=\"{:.2f}\" x=\"{:.1f}\" y=\"{:.2f}\" text-anchor=\"end\">{:.0f}%</text>\n",
                         left - 4, y, left, y, v, left - 6, y + 4, 100 * v);
    }
    const double uniform_y = base - kLoadFigureBarScale / double(r.num_experts);
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.2f}\" x2=\"{:.1f}\" y2=\"{:.2f}\" stroke=\"#888\" "
                       "stroke-dasharray=\"4 3\"/>\n", left, uniform_y, panel_w - 10, uniform_y);
    for (size_t e = 0; e < experts; ++e) {
      const double gx = left + double(e) * group_w;
      for (size_t d = 0; d < domains; ++d) {
        const double share = r.domains[d].layers[l].load_share[e];
        const double h = share * kLoadFigureBarScale;
        svg += fmt::format("<rect class=\"bar\" data-domain=\"{}\" data-expert=\"{}\" data-share=\"{:.6f}\" x=\"{:.1f}\" "
                           "y=\"{:.3f}\" width=\"{:.1f}\" height=\"{:.3f}\" fill=\"{}\"><title>{} e{}: {:.1f}%</title></rect>\n",
                           escape(r.domains[d].name), e, share, gx + double(d) * bar_w, base - h, bar_w, h, colour(d),
                           escape(r.domains[d].name), e, 100 * share);
      }
      svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">e{}</text>\n",
                         gx + double(domains) * bar_w / 2, base + 13, e);
    }
    svg += "</g>\n";
  }
  const double ly = 30 + double(layers) * panel_h;
  for (size_t d = 0; d < domains; ++d)
    svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1f}\" "
                       "y=\"{:.1f}\">{} ({} tokens)</text>\n", left, ly + 18.0 * double(d), colour(d), left + 16,
                       ly + 18.0 * double(d) + 9, escape(r.domains[d].name), r.domains[d].tokens);
  svg += "</svg>\n";
  return svg;
}

}  // namespace moelab::analysis
