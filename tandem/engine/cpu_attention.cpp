// Grouped-query attention of a few new query rows (a decode step, a verify block) over the KV cache, for x86
// CPUs with AVX512-BF16: softmax(q.k / sqrt(head_dim)) . v, scores, softmax and the weighted sum in float32.
//
// Work goes by KV head: the query rows that share one (heads of a group times new tokens) are taken in blocks,
// and each load of the cache serves the whole block. Keys are cached transposed, [kv_heads, head_dim, len], so
// q.k runs across positions: two dims of 32 positions, interleaved into pairs, meet a broadcast pair of the
// query in vdpbf16ps (exact products, float32 sums). Values [kv_heads, len, head_dim] are widened to float32
// with a shift and a mask, which splits a row into its even and odd dims; the weighted sum keeps that split
// and undoes it when storing.
//
// A row's result depends on nothing but its own query and the cache rows it sees: its scores are summed over
// dims in one order, lanes that belong to other rows or to padding are never mixed in, and the weighted sum
// runs over its own positions in order. So a decode step at position p gives the same bits as the row at p
// of a verify block, whatever the block, its split into tiles or the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kChunk = 32;    // cache positions a step of q.k takes
constexpr int kMaxRows = 12;  // query rows sharing the loads of q.k: 24 accumulators
constexpr int kMaxVecs = 16;  // float32 vectors of a row of values: head_dim <= 256
constexpr int64_t kAhead = 64;  // positions ahead to prefetch keys: a step's weights have evicted the cache
constexpr int64_t kMinPartRows = 6;  // rows that a thread's part of a KV head keeps, to pay for reading the head

// Loops over registers must unroll, or the accumulators live on the stack.
#define UNROLL _Pragma("GCC unroll 16")

// vdpbf16ps on interleaved rows gives positions 0-3, 8-11, ... (low) and 4-7, 12-15, ... (high) of a chunk;
// these put them back in order.
struct Order {
  alignas(64) int32_t first[16], second[16];
  Order() {
    for (int p = 0; p < 32; ++p) {
      const int lane = p / 8, j = p % 8;
      const int32_t idx = j < 4 ? 4 * lane + j : 16 + 4 * lane + j - 4;
      (p < 16 ? first[p] : second[p - 16]) = idx;
    }
  }
};
const Order kOrder;

inline __mmask32 live32(int64_t left) {
  return left >= 32 ? ~__mmask32(0) : left <= 0 ? __mmask32(0) : static_cast<__mmask32>((1u << left) - 1);
}
inline __mmask16 live16(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1);
}

// Raw scores (q.k, unscaled) of MT query rows against positions [c0, c0 + 32 * NC) of one KV head's keys,
// positions from `n` on left out of the loads. kt: [head_dim][ldk]; s: [MT][lds].
template <typename T, int MT, int NC>
inline void score_chunks(const T* const* q, const T* kt, int64_t ldk, int hd, int64_t c0, int64_t n, float* s,
                         int64_t lds) {
  __m512 lo[MT][NC], hi[MT][NC];
  UNROLL
  for (int r = 0; r < MT; ++r)
    UNROLL
    for (int c = 0; c < NC; ++c) lo[r][c] = hi[r][c] = _mm512_setzero_ps();
  if constexpr (std::is_same_v<T, uint16_t>) {
    __mmask32 mask[NC];
    UNROLL
    for (int c = 0; c < NC; ++c) mask[c] = live32(n - c0 - c * kChunk);
    for (int e = 0; e < hd / 2; ++e) {
      const uint16_t* k0 = kt + 2 * e * ldk + c0;
      __m512i kl[NC], kh[NC];
      UNROLL
      for (int c = 0; c < NC; ++c) {
        if (c0 + c * kChunk + kAhead >= n) break;
        _mm_prefetch(reinterpret_cast<const char*>(k0 + kAhead + c * kChunk), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(k0 + ldk + kAhead + c * kChunk), _MM_HINT_T0);
      }
      UNROLL
      for (int c = 0; c < NC; ++c) {
        const __m512i a = _mm512_maskz_loadu_epi16(mask[c], k0 + c * kChunk);
        const __m512i b = _mm512_maskz_loadu_epi16(mask[c], k0 + ldk + c * kChunk);
        kl[c] = _mm512_unpacklo_epi16(a, b);  // pairs (dim 2e, dim 2e + 1) of one position
        kh[c] = _mm512_unpackhi_epi16(a, b);
      }
      UNROLL
      for (int r = 0; r < MT; ++r) {
        uint32_t pair;
        std::memcpy(&pair, q[r] + 2 * e, 4);
        const __m512bh qp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        UNROLL
        for (int c = 0; c < NC; ++c) {
          lo[r][c] = _mm512_dpbf16_ps(lo[r][c], (__m512bh)kl[c], qp);
          hi[r][c] = _mm512_dpbf16_ps(hi[r][c], (__m512bh)kh[c], qp);
        }
      }
    }
    // lo and hi hold the chunk's positions interleaved: put them back in order.
    const __m512i first = _mm512_load_si512(kOrder.first), second = _mm512_load_si512(kOrder.second);
    UNROLL
    for (int r = 0; r < MT; ++r)
      UNROLL
      for (int c = 0; c < NC; ++c) {
        const __m512 a = _mm512_permutex2var_ps(lo[r][c], first, hi[r][c]);
        hi[r][c] = _mm512_permutex2var_ps(lo[r][c], second, hi[r][c]);
        lo[r][c] = a;
      }
  } else {  // float32: lo and hi are the chunk's two halves
    __mmask16 mask[NC][2];
    UNROLL
    for (int c = 0; c < NC; ++c)
      UNROLL
      for (int h = 0; h < 2; ++h) mask[c][h] = live16(n - c0 - c * kChunk - 16 * h);
    for (int d = 0; d < hd; ++d) {
      const float* k0 = kt + d * ldk + c0;
      UNROLL
      for (int c = 0; c < NC; ++c) {
        if (c0 + c * kChunk + kAhead >= n) break;
        _mm_prefetch(reinterpret_cast<const char*>(k0 + kAhead + c * kChunk), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(k0 + kAhead + c * kChunk + 16), _MM_HINT_T0);
      }
      __m512 a[NC], b[NC];
      UNROLL
      for (int c = 0; c < NC; ++c) {
        a[c] = _mm512_maskz_loadu_ps(mask[c][0], k0 + c * kChunk);
        b[c] = _mm512_maskz_loadu_ps(mask[c][1], k0 + c * kChunk + 16);
      }
      UNROLL
      for (int r = 0; r < MT; ++r) {
        const __m512 qd = _mm512_set1_ps(q[r][d]);
        UNROLL
        for (int c = 0; c < NC; ++c) {
          lo[r][c] = _mm512_fmadd_ps(a[c], qd, lo[r][c]);
          hi[r][c] = _mm512_fmadd_ps(b[c], qd, hi[r][c]);
        }
      }
    }
  }
  UNROLL
  for (int r = 0; r < MT; ++r)
    UNROLL
    for (int c = 0; c < NC; ++c) {
      if (c0 + c * kChunk >= n) continue;
      float* out = s + r * lds + c0 + c * kChunk;
      _mm512_storeu_ps(out, lo[r][c]);
      _mm512_storeu_ps(out + 16, hi[r][c]);
    }
}

// Chunks in groups of NC for independent accumulators where few rows share them, the rest one by one: each
// chunk is summed alike either way.
template <typename T, int MT>
void scores(const T* const* q, const T* kt, int64_t ldk, int hd, int64_t n, float* s, int64_t lds) {
  constexpr int NC = MT <= 2 ? 4 : MT <= 6 ? 2 : 1;
  int64_t c0 = 0;
  for (; c0 + NC * kChunk <= n; c0 += NC * kChunk) score_chunks<T, MT, NC>(q, kt, ldk, hd, c0, n, s, lds);
  for (; c0 < n; c0 += kChunk) score_chunks<T, MT, 1>(q, kt, ldk, hd, c0, n, s, lds);
}

// 2^x for x <= 0 (Cephes' exp2f polynomial on [-1/2, 1/2], relative error ~2e-7): 2^f * 2^n by scalef.
inline __m512 exp2_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));  // below, 2^x is no term of a sum that holds 2^0
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One row's raw scores at positions [0, n) -> exp(scale * (s - max)) in place (zeros to the next 16);
// returns 1 / their sum.
inline float softmax_row(float* s, int64_t n, float scale) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = live16(n - j);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, s + j));
  }
  const float c = scale * 1.4426950408889634f;  // to base 2
  const __m512 vc = _mm512_set1_ps(c), shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * c);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = live16(n - j);
    const __m512 p = _mm512_maskz_mov_ps(m, exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vc, shift)));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// A row of values widened to float32: NV vectors; bfloat16 rows split into even and odd dims of each 32.
template <typename T, int NV>
inline void load_values(const T* v, __m512 (&x)[NV]) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    UNROLL
    for (int m = 0; m < NV / 2; ++m) {
      const __m512i w = _mm512_loadu_si512(v + 32 * m);
      x[2 * m] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      x[2 * m + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, odd));
    }
  } else {
    UNROLL
    for (int m = 0; m < NV; ++m) x[m] = _mm512_loadu_ps(v + 16 * m);
  }
}

template <typename T, int NV>
inline void store_row(T* out, const __m512 (&acc)[NV], float inv) {
  const __m512 scale = _mm512_set1_ps(inv);
  if constexpr (std::is_same_v<T, uint16_t>) {  // rounded to nearest even, as torch does; dims interleaved back
    UNROLL
    for (int m = 0; m < NV / 2; ++m) {
      const __m512i even = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[2 * m], scale)));
      const __m512i odd = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[2 * m + 1], scale)));
      _mm512_storeu_si512(out + 32 * m, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
  } else {
    UNROLL
    for (int m = 0; m < NV; ++m) _mm512_storeu_ps(out + 16 * m, _mm512_mul_ps(acc[m], scale));
  }
}

// out[r] = sum over j < end[r] of p[r][j] * v[j], times inv[r]. Rows come in order of end: all of them take
// the positions before the first end, the rest only their own.
template <typename T, int NV, int MT>
void weighted(const float* p, int64_t ldp, const int64_t* end, const float* inv, const T* v, int64_t ldv,
              T* const* out) {
  __m512 acc[MT][NV];
  UNROLL
  for (int r = 0; r < MT; ++r)
    UNROLL
    for (int k = 0; k < NV; ++k) acc[r][k] = _mm512_setzero_ps();
  const int64_t shared = end[0], last = end[MT - 1];
  int64_t j = 0;
  for (; j < shared; ++j) {
    __m512 x[NV];
    load_values<T, NV>(v + j * ldv, x);
    UNROLL
    for (int r = 0; r < MT; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r * ldp + j]);
      UNROLL
      for (int k = 0; k < NV; ++k) acc[r][k] = _mm512_fmadd_ps(pj, x[k], acc[r][k]);
    }
  }
  for (; j < last; ++j) {
    __m512 x[NV];
    load_values<T, NV>(v + j * ldv, x);
    UNROLL
    for (int r = 0; r < MT; ++r) {
      if (j >= end[r]) continue;
      const __m512 pj = _mm512_set1_ps(p[r * ldp + j]);
      UNROLL
      for (int k = 0; k < NV; ++k) acc[r][k] = _mm512_fmadd_ps(pj, x[k], acc[r][k]);
    }
  }
  UNROLL
  for (int r = 0; r < MT; ++r) store_row<T, NV>(out[r], acc[r], inv[r]);
}

template <typename T>
using ScoreFn = void (*)(const T* const*, const T*, int64_t, int, int64_t, float*, int64_t);
template <typename T>
using WeightFn = void (*)(const float*, int64_t, const int64_t*, const float*, const T*, int64_t, T* const*);

// Rows the weighted sum takes together: NV accumulators each, 24 in all.
constexpr int weight_rows(int nv) { return std::max(1, std::min(6, 24 / nv)); }

template <typename T, int... I>
constexpr std::array<ScoreFn<T>, sizeof...(I)> make_scores(std::integer_sequence<int, I...>) {
  return {{&scores<T, I + 1>...}};
}

template <typename T, int NV, int... I>
constexpr std::array<WeightFn<T>, 6> make_weights(std::integer_sequence<int, I...>) {
  return {{&weighted<T, NV, std::min(I + 1, weight_rows(NV))>...}};
}

template <typename T, int... H>
constexpr std::array<std::array<WeightFn<T>, 6>, sizeof...(H)> make_weight_table(std::integer_sequence<int, H...>) {
  return {{make_weights<T, 2 * (H + 1)>(std::make_integer_sequence<int, 6>{})...}};
}

template <typename T>
struct Kernels {
  static constexpr auto score = make_scores<T>(std::make_integer_sequence<int, kMaxRows>{});
  static constexpr auto weight = make_weight_table<T>(std::make_integer_sequence<int, kMaxVecs / 2>{});
};

struct Problem {
  int64_t k_new, nh, nkv, hd, pos;
  int64_t sq0, sq1;  // q's strides (its last is 1)
  int64_t sk0, sk1;  // keys_t's
  int64_t sv0, sv1;  // values'
  float scale;
};

// Rows [r0, r1) of KV head kv, in blocks of at most kMaxRows; row r is token r / group of head kv * group + r % group.
template <typename T>
void attend_rows(const Problem& P, const T* q, const T* keys, const T* values, T* out, int64_t kv, int64_t r0,
                 int64_t r1, std::vector<float>& buf) {
  const int64_t group = P.nh / P.nkv;
  const int nv = static_cast<int>(P.hd / 16), wrows = weight_rows(nv);
  const T* kt = keys + kv * P.sk0;
  const T* v = values + kv * P.sv0;
  const int64_t blocks = (r1 - r0 + kMaxRows - 1) / kMaxRows;
  for (int64_t b = 0; b < blocks; ++b) {  // blocks of even size
    const int64_t b0 = r0 + (r1 - r0) * b / blocks, b1 = r0 + (r1 - r0) * (b + 1) / blocks;
    const int mt = static_cast<int>(b1 - b0);
    const T* qr[kMaxRows];
    T* orow[kMaxRows];
    int64_t end[kMaxRows];
    float inv[kMaxRows];
    for (int i = 0; i < mt; ++i) {
      const int64_t r = b0 + i, tok = r / group, head = kv * group + r % group;
      qr[i] = q + tok * P.sq0 + head * P.sq1;
      orow[i] = out + (tok * P.nh + head) * P.hd;
      end[i] = P.pos + tok + 1;
    }
    const int64_t n = end[mt - 1];
    int64_t lds = (n + kChunk - 1) / kChunk * kChunk;
    if (lds % 1024 == 0) lds += 16;  // rows a multiple of 4 KiB apart alias in the L1
    if (static_cast<int64_t>(buf.size()) < mt * lds) buf.resize(mt * lds);
    float* s = buf.data();
    Kernels<T>::score[mt - 1](qr, kt, P.sk1, static_cast<int>(P.hd), n, s, lds);
    for (int i = 0; i < mt; ++i) inv[i] = softmax_row(s + i * lds, end[i], P.scale);
    for (int w0 = 0; w0 < mt;) {
      const int w = std::min(wrows, mt - w0);
      Kernels<T>::weight[nv / 2 - 1][w - 1](s + w0 * lds, lds, end + w0, inv + w0, v, P.sv1, orow + w0);
      w0 += w;
    }
  }
}

template <typename T>
void attend(const Problem& P, const T* q, const T* keys, const T* values, T* out) {
  const int64_t rows = P.k_new * (P.nh / P.nkv);
  // Units of work: KV heads, cut into parts of rows where there are more threads than heads to go round and
  // enough rows to share each read of the cache (a decode step's 3 rows of a head stay together: 2 threads
  // reading it twice from memory took longer than one thread taking two heads).
  const int64_t threads = at::get_num_threads();
  int64_t parts = 1;
  if (threads > 1) parts = std::min((2 * threads + P.nkv - 1) / P.nkv, std::max<int64_t>(1, rows / kMinPartRows));
  parts = std::max<int64_t>(parts, (rows + kMaxRows * 4 - 1) / (kMaxRows * 4));  // prompts: small units balance
  at::parallel_for(0, P.nkv * parts, 1, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> buf;  // the scores of a block of rows
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t kv = u / parts, part = u % parts;
      attend_rows<T>(P, q, keys, values, out, kv, rows * part / parts, rows * (part + 1) / parts, buf);
    }
  });
}

// Numbers go into messages through std::to_string (see cpu_int4.cpp).
std::string num(int64_t v) { return std::to_string(v); }

std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + num(sizes[i]);
  return out + "]";
}

at::Tensor gqa_attention(const at::Tensor& q_in, const at::Tensor& keys_in, const at::Tensor& values_in,
                         int64_t pos) {
  TORCH_CHECK(q_in.dim() == 3, "gqa_attention: q must be [k_new, heads, head_dim], got " + shape(q_in.sizes()));
  TORCH_CHECK(keys_in.dim() == 3,
              "gqa_attention: keys_t must be [kv_heads, head_dim, len], got " + shape(keys_in.sizes()));
  TORCH_CHECK(values_in.dim() == 3,
              "gqa_attention: values must be [kv_heads, len, head_dim], got " + shape(values_in.sizes()));
  TORCH_CHECK(q_in.device().is_cpu() && keys_in.device().is_cpu() && values_in.device().is_cpu(),
              "gqa_attention: tensors must be on the CPU");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "gqa_attention: q must be bfloat16 or float32, got ",
              dtype);
  TORCH_CHECK(keys_in.scalar_type() == dtype && values_in.scalar_type() == dtype,
              "gqa_attention: q, keys_t and values must share a dtype, got ", dtype, ", ", keys_in.scalar_type(),
              ", ", values_in.scalar_type());
  const int64_t k_new = q_in.size(0), nh = q_in.size(1), hd = q_in.size(2), nkv = keys_in.size(0);
  TORCH_CHECK(hd % 32 == 0 && 32 <= hd && hd <= 16 * kMaxVecs,
              "gqa_attention: head_dim must be a multiple of 32 up to 256, got " + num(hd));
  TORCH_CHECK(nkv > 0 && nh % nkv == 0,
              "gqa_attention: " + num(nh) + " query heads do not share " + num(nkv) + " KV heads evenly");
  TORCH_CHECK(keys_in.size(1) == hd && values_in.size(0) == nkv && values_in.size(2) == hd,
              "gqa_attention: keys_t " + shape(keys_in.sizes()) + " and values " + shape(values_in.sizes()) +
                  " do not match q " + shape(q_in.sizes()));
  TORCH_CHECK(pos >= 0 && pos + k_new <= keys_in.size(2) && pos + k_new <= values_in.size(1),
              "gqa_attention: " + num(k_new) + " rows at position " + num(pos) + " do not fit a cache of " +
                  num(keys_in.size(2)) + " keys and " + num(values_in.size(1)) + " values");

  // Only the last dim must be dense; the cache is, so this copies nothing in the engine.
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor keys = keys_in.stride(2) == 1 ? keys_in : keys_in.contiguous();
  const at::Tensor values = values_in.stride(2) == 1 ? values_in : values_in.contiguous();
  at::Tensor out = at::empty({k_new, nh, hd}, q.options());
  if (k_new == 0 || nh == 0) return out;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const Problem P{k_new, nh, nkv, hd, pos, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                  values.stride(0), values.stride(1), scale};
  if (dtype == at::kBFloat16) {
    attend<uint16_t>(P, reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()),
                     reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>()),
                     reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()),
                     reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else {
    attend<float>(P, q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

}  // namespace

// cpu_int4.cpp holds the library's TORCH_LIBRARY; this file adds to it.
TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("gqa_attention(Tensor q, Tensor keys_t, Tensor values, SymInt pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("gqa_attention", &gqa_attention); }
