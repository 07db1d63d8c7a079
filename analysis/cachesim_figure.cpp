// Hit rate against cache size per policy, as SVG (analysis/cachesim_figure.hpp).
#include "analysis/cachesim_figure.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.hpp"

namespace moelab::analysis {

namespace {

const char* colour(size_t i) {  // Okabe & Ito, colour-blind safe
  static const char* palette[] = {"#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"};
  return palette[i % std::size(palette)];
}

}  // namespace

std::string cache_hit_rate_svg(const CacheSimReport& r) {
  if (r.results.empty() || r.options.cache_sizes.empty()) throw Error("cache figure: no simulation results");
  const int cmax = r.options.cache_sizes.back();
  const double plot_w = 440, step_x = plot_w / cmax, left = kCacheFigureLeft, bottom = kCacheFigureBottom,
               height = kCacheFigureHeight;
  const std::string title = fmt::format("Expert cache hit rate against cache size ({} layers, top-{} of {} experts, batch {})",
                                        r.num_layers, r.top_k, r.num_experts, r.options.batch);
  const double legend_x = left + plot_w + 20, width = std::max(legend_x + 150, 20 + 0.62 * 13 * double(title.size()));
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" font-family=\"sans-serif\" "
      "font-size=\"11\">\n<text x=\"10\" y=\"18\" font-size=\"13\">{}</text>\n",
      width, bottom + 50, title);
  // Axes, ticks every 10%, cache sizes along x.
  svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#444\"/>\n", left, bottom,
                     bottom - height);
  svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"#444\"/>\n", left, bottom,
                     left + plot_w);
  for (int t = 0; t <= 10; ++t) {
    const double y = bottom - t * height / 10;
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.2f}\" x2=\"{:.1f}\" y2=\"{:.2f}\" stroke=\"#ddd\"/>"
                       "<text class=\"tick-label\" data-rate=\"{:.1f}\" x=\"{:.1f}\" y=\"{:.2f}\" text-anchor=\"end\">{}%</text>\n",
                       left, y, left + plot_w, y, t / 10.0, left - 5, y + 4, t * 10);
  }
  for (int c : r.options.cache_sizes)
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", left + c * step_x, bottom + 15, c);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">experts per layer on the GPU (C)</text>\n",
                     left + plot_w / 2, bottom + 32);
  svg += fmt::format("<text x=\"14\" y=\"{:.1f}\" transform=\"rotate(-90 14 {:.1f})\" text-anchor=\"middle\">hit rate</text>\n",
                     bottom - height / 2, bottom - height / 2);
  size_t i = 0;
  for (auto p : r.options.policies) {
    const bool bound = p == cachesim::Policy::Belady;
    const std::string name = cachesim::policy_name(p);
    std::string points, dots;
    for (int c : r.options.cache_sizes) {
      const auto* res = r.find(p, c);
      if (!res) continue;
      const auto t = res->total();
      const double h = t.requests ? double(t.hits) / double(t.requests) : 0;
      const double x = left + c * step_x, y = bottom - h * height;
      points += fmt::format("{:.2f},{:.2f} ", x, y);
      dots += fmt::format("<circle class=\"point\" data-policy=\"{}\" data-cache-size=\"{}\" data-hit-rate=\"{:.6f}\" "
                          "cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"2.5\" fill=\"{}\"><title>{} C={}: {:.1f}%</title></circle>\n",
                          name, c, h, x, y, bound ? "#000" : colour(i), name, c, 100 * h);
    }
    svg += fmt::format("<polyline class=\"policy\" data-policy=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{}\" "
                       "stroke-width=\"{}\"{}/>\n{}", name, points, bound ? "#000" : colour(i), bound ? 2.5 : 1.5,
                       bound ? " stroke-dasharray=\"6 3\"" : "", dots);
    const double ly = bottom - height + 14.0 * double(i);
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" stroke-width=\"{}\"{}/>"
                       "<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n", legend_x, ly, legend_x + 20, ly,
                       bound ? "#000" : colour(i), bound ? 2.5 : 1.5, bound ? " stroke-dasharray=\"6 3\"" : "",
                       legend_x + 25, ly + 4, bound ? name + " (optimum)" : name);
    if (!bound) ++i;
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace moelab::analysis
