#pragma once
// The cache simulator's figure as a self-contained SVG (no plotting library, like analysis/load_figure.hpp):
// hit rate (all layers) against cache size, one line per policy, Belady's optimum drawn as the bound
// (thick, dashed); the lines' points carry their values as data attributes.
#include <string>

#include "analysis/cachesim.hpp"

namespace moelab::analysis {

std::string cache_hit_rate_svg(const CacheSimReport& report);

// Geometry shared with the tests: the plot area's origin (cache size 0 would sit at kCacheFigureLeft),
// a hit rate h is drawn at y = kCacheFigureBottom − h · kCacheFigureHeight.
inline constexpr double kCacheFigureLeft = 60, kCacheFigureBottom = 330, kCacheFigureHeight = 280;

}  // namespace moelab::analysis
