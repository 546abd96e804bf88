// int4 weight-only matmul for x86 CPUs with AVX512-BF16: y = x @ W.T, W = q * scale + min per 32 columns.
//
// Codes are laid out for one instruction: output rows go in blocks of 16, and for each block and
// 32-column group the codes take 256 bytes, 8 loads of 32. Byte 2i + t of load l holds, for row i of
// the block, column 4l + t of the group in its low nibble and column 4l + 2 + t in its high nibble.
// A load widened to 16-bit lanes and looked up in a table of bf16(0..15) gives, per 32-bit lane, the
// codes of one row at two neighbouring columns: exactly what vdpbf16ps multiplies with a broadcast
// pair of activations. The codes are converted once per load and serve every row of x in the tile.
//
// Products of bf16 activations with exact codes are exact in float32, and the group's sum is
// scaled once: y += scale * sum(x * q) + min * sum(x). Every row of x is summed in the same order
// whatever tile it falls in, so a decode step's row equals the same row of a verify block bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRows = 16;        // output rows per block
constexpr int64_t kBlockBytes = 256;  // codes of one block for one group
constexpr int64_t kMaxTile = 9;       // rows of x per tile: a decode, or a verify of 8 drafts

struct Table {
  alignas(64) uint16_t v[32];
  Table() {
    for (int i = 0; i < 32; ++i) {
      float f = static_cast<float>(i & 15);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      v[i] = static_cast<uint16_t>(bits >> 16);  // exact: small integers have short mantissas
    }
  }
};
const Table kTable;

// Where a tile's results go: y [M, n] in bfloat16 or float32, its last block possibly short.
struct Out {
  void* ptr;
  int64_t ld;
  int64_t n;
  bool bf16;

  inline void store(int64_t row, int64_t col, __m512 v) const {
    const int64_t count = std::min<int64_t>(kRows, n - col);
    if (count <= 0) return;
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    if (bf16) {
      auto* p = static_cast<uint16_t*>(ptr) + row * ld + col;
      _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(ptr) + row * ld + col, mask, v);
    }
  }
};

// MT rows of x against NB blocks of 16 output rows, all of K. xb: bf16 bits [MT, K]; xsum: [MT, G].
template <int MT, int NB>
void tile(const uint16_t* xb, int64_t ldx, const float* xsum, int64_t G, const uint8_t* codes, const at::Half* sm,
          const Out& out, int64_t row0, int64_t col0) {
  const __m512i table = _mm512_load_si512(kTable.v);
  __m512 y[MT][NB];
  for (int r = 0; r < MT; ++r)
    for (int b = 0; b < NB; ++b) y[r][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 a0[MT][NB], a1[MT][NB];
    for (int r = 0; r < MT; ++r)
      for (int b = 0; b < NB; ++b) {
        a0[r][b] = _mm512_setzero_ps();
        a1[r][b] = _mm512_setzero_ps();
      }
    for (int l = 0; l < 8; ++l) {
      for (int b = 0; b < NB; ++b) {
        const uint8_t* p = codes + (b * G + g) * kBlockBytes + l * 32;
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(w, table);
        const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
        for (int r = 0; r < MT; ++r) {
          uint32_t x01, x23;
          std::memcpy(&x01, xb + r * ldx + g * kGroup + l * 4, 4);
          std::memcpy(&x23, xb + r * ldx + g * kGroup + l * 4 + 2, 4);
          a0[r][b] = _mm512_dpbf16_ps(a0[r][b], lo, (__m512bh)_mm512_set1_epi32(static_cast<int>(x01)));
          a1[r][b] = _mm512_dpbf16_ps(a1[r][b], hi, (__m512bh)_mm512_set1_epi32(static_cast<int>(x23)));
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const at::Half* s = sm + (b * G + g) * 2 * kRows;
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
      const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kRows)));
      for (int r = 0; r < MT; ++r) {
        y[r][b] = _mm512_fmadd_ps(_mm512_add_ps(a0[r][b], a1[r][b]), scale, y[r][b]);
        y[r][b] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * G + g]), mins, y[r][b]);
      }
    }
  }
  for (int r = 0; r < MT; ++r)
    for (int b = 0; b < NB; ++b) out.store(row0 + r, col0 + b * kRows, y[r][b]);
}

using TileFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, const uint8_t*, const at::Half*, const Out&,
                        int64_t, int64_t);

// Blocks of 16 output rows per tile, at most: with few rows of x, more blocks give vdpbf16ps independent
// accumulators to hide its latency; one keeps a single stream of codes per thread. Which wins depends on
// the machine (cpu_kernels.tune times them); the register file bounds the count.
constexpr int max_blocks(int mt) { return mt <= 2 ? 4 : mt <= 4 ? 2 : 1; }
constexpr int kBlockChoices[3] = {1, 2, 4};

template <int... I>
constexpr std::array<std::array<TileFn, 3>, sizeof...(I)> make_tiles(std::integer_sequence<int, I...>) {
  return {{{&tile<I + 1, std::min(kBlockChoices[0], max_blocks(I + 1))>,
            &tile<I + 1, std::min(kBlockChoices[1], max_blocks(I + 1))>,
            &tile<I + 1, std::min(kBlockChoices[2], max_blocks(I + 1))>}...}};
}
const auto kTiles = make_tiles(std::make_integer_sequence<int, kMaxTile>{});

// x: [M, K] bf16 bits; xsum: [M, G]. choice: index into kBlockChoices.
void matmul(const uint16_t* xb, const float* xsum, int64_t M, int64_t K, const uint8_t* codes, const at::Half* sm,
            int64_t n_blocks, const Out& out, int choice) {
  const int64_t G = K / kGroup;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
    const int64_t mt = std::min<int64_t>(kMaxTile, M - m0);
    const int64_t nb = std::min(kBlockChoices[choice], max_blocks(static_cast<int>(mt)));
    const int64_t wide = n_blocks / nb;
    const TileFn fw = kTiles[mt - 1][choice], f1 = kTiles[mt - 1][0];
    // Tiles of nb blocks, then the leftover blocks one at a time.
    const int64_t units = wide + (n_blocks - wide * nb);
    at::parallel_for(0, units, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t blk = u < wide ? u * nb : wide * nb + (u - wide);
        (u < wide ? fw : f1)(xb + m0 * K, K, xsum + m0 * G, G, codes + blk * G * kBlockBytes,
                             sm + blk * G * 2 * kRows, out, m0, blk * kRows);
      }
    });
  }
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_mins, int64_t n,
                   int64_t blocks) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "int4_mm: x must be a 2-d CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "int4_mm: x must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.size(2) == 8 && codes.size(3) == 32,
              "int4_mm: codes must be uint8 [blocks, groups, 8, 32]");
  TORCH_CHECK(scales_mins.scalar_type() == at::kHalf && scales_mins.dim() == 4 && scales_mins.size(2) == 2 &&
                  scales_mins.size(3) == kRows,
              "int4_mm: scales_mins must be float16 [blocks, groups, 2, 16]");
  TORCH_CHECK(codes.is_contiguous() && scales_mins.is_contiguous(), "int4_mm: codes and scales must be contiguous");
  const int64_t n_blocks = codes.size(0), G = codes.size(1), K = G * kGroup, M = x.size(0);
  // Numbers go into messages through std::to_string: one torch build crashed formatting an int64_t into a
  // TORCH_CHECK message from an extension built by another compiler.
  TORCH_CHECK(x.size(1) == K,
              "int4_mm: x has " + std::to_string(x.size(1)) + " columns, the weights " + std::to_string(K));
  TORCH_CHECK(scales_mins.size(0) == n_blocks && scales_mins.size(1) == G, "int4_mm: scales do not match codes");
  TORCH_CHECK(0 < n && n <= n_blocks * kRows,
              "int4_mm: " + std::to_string(n) + " output rows from " + std::to_string(n_blocks) + " blocks");

  const int choice = static_cast<int>(std::find(std::begin(kBlockChoices), std::end(kBlockChoices), blocks) -
                                      std::begin(kBlockChoices));
  TORCH_CHECK(choice < 3, "int4_mm: blocks must be 1, 2 or 4, got " + std::to_string(blocks));
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* sm = scales_mins.data_ptr<at::Half>();
  if (x.scalar_type() == at::kBFloat16) {
    const auto* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    std::vector<float> xsum(M * G);
    for (int64_t i = 0; i < M * G; ++i) {
      float s = 0.f;
      for (int64_t j = 0; j < kGroup; ++j) s += bf16_to_float(xb[i * kGroup + j]);
      xsum[i] = s;
    }
    matmul(xb, xsum.data(), M, K, c, sm, n_blocks, Out{y.data_ptr(), n, n, true}, choice);
    return y;
  }
  // float32: x = hi + lo in bfloat16, run as 2M rows into a float scratch; the mins see the exact sums once.
  const float* xf = xc.data_ptr<float>();
  std::vector<uint16_t> xb(2 * M * K);
  std::vector<float> xsum(2 * M * G, 0.f);
  for (int64_t i = 0; i < M * K; ++i) {
    const uint16_t hi = float_to_bf16(xf[i]);
    xb[i] = hi;
    xb[M * K + i] = float_to_bf16(xf[i] - bf16_to_float(hi));
    xsum[i / kGroup] += xf[i];
  }
  std::vector<float> scratch(2 * M * n);
  matmul(xb.data(), xsum.data(), 2 * M, K, c, sm, n_blocks, Out{scratch.data(), n, n, false}, choice);
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < M * n; ++i) yp[i] = scratch[i] + scratch[M * n + i];
  return y;
}

}  // namespace

TORCH_LIBRARY(tandem_cpu, m) {
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scales_mins, int n, int blocks) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) { m.impl("int4_mm", &int4_mm); }
