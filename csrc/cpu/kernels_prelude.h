// Headers needed by kernels_impl.h, included once at the default target before any
// `#pragma GCC target` region (standard headers must not be compiled for a wider ISA).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/activations.h"
#include "common/bf16.h"
#include "common/bn.h"
#include "common/index_maps.h"
#include "cpu/kernels.h"
