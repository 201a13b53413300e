// BatchNorm helpers: folding (eval), Chan's parallel variance merge (training statistics), and the
// coefficients of the training-mode BatchNorm backward. Plain C++, double precision.
#pragma once
#include <cmath>

#include "common/macros.h"

namespace emcad {

// a = gamma * (z - mean) * rstd + beta = z * scale + shift
struct BnAffine {
  double scale, shift;
};

EMCAD_INLINE BnAffine bn_fold(double gamma, double beta, double mean, double var, double eps) {
  const double rstd = 1.0 / std::sqrt(var + eps);
  const double scale = gamma * rstd;
  return {scale, beta - mean * scale};
}

// (count, mean, M2) accumulator; merge() is Chan et al.'s pairwise update. The result depends on the merge
// order, so callers merge partials in a fixed order.
// merge() is always inlined: compiled into each caller for the caller's instruction set, so a kernel built for
// AVX2/AVX-512 always contracts its multiply-adds into FMAs. Left to GCC's inliner, whether a call was inlined
// (contracted) or not (a default-target copy, no FMA) depended on the size of the whole translation unit, and
// so did the last bit of the statistics.
struct Welford {
  double n = 0, mean = 0, m2 = 0;
  EMCAD_INLINE void merge(double nb, double meanb, double m2b) {
    if (nb <= 0) return;
    if (n <= 0) {
      n = nb; mean = meanb; m2 = m2b;
      return;
    }
    const double tot = n + nb;
    const double delta = meanb - mean;
    mean += delta * (nb / tot);
    m2 += m2b + delta * delta * (n * nb / tot);
    n = tot;
  }
  EMCAD_HD double var_biased() const { return n > 0 ? m2 / n : 0.0; }
};

// Training-mode BN backward per channel: with ga = dL/da (after the activation backward), S1 = sum(ga),
// S2 = sum(ga * zhat), M = count, the input gradient is
//   dz = gamma*rstd * (ga - S1/M - zhat*S2/M) = c1*ga + c2*zhat + c3.
// In eval mode dz = gamma*rstd*ga (c2 = c3 = 0).
struct BnBackCoef {
  double c1, c2, c3;
};

EMCAD_INLINE BnBackCoef bn_back_coef(double gamma, double rstd, double s1, double s2, double count, bool training) {
  const double c1 = gamma * rstd;
  if (!training) return {c1, 0.0, 0.0};
  return {c1, -c1 * s2 / count, -c1 * s1 / count};
}

}  // namespace emcad
