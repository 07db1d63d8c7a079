#pragma once
// The Mixtral paper's Figure 7 as a self-contained SVG, drawn without any plotting library: for each
// layer a panel of grouped bars, one group per expert and one bar per domain, height = the expert's share
// of that domain's top-k choices, with a dashed line at the uniform share 1/E. So `moelab demo` shows
// routing by domain even where Python and matplotlib are absent (scripts/plot_routing.py draws more).
#include <string>

#include "analysis/stats.hpp"

namespace moelab::analysis {

// Needs a report computed by domain (compute_stats(trace, true)); throws moelab::Error otherwise.
std::string expert_load_by_domain_svg(const StatsReport& report);

// Geometry shared with the tests: a bar of share s is s * kLoadFigureBarScale pixels tall.
inline constexpr double kLoadFigureBarScale = 400.0;

}  // namespace moelab::analysis
