// The quantized product y = x W^T for MLX's CPU backend, as a primitive of MLX's graph.
//
// MLX's CPU quantized_matmul is a scalar loop (~1 ns per weight). This primitive takes rows of float32
// x (decode, batched decode, speculative verification, short prompt chunks: lfm_mlx.quantized sends up
// to 128, or every row where AMX runs) against affine 4- or 8-bit weights in MLX's layout
// (w = scale * q + bias per group), with two kernels:
//   - float activations: each weight unpacked to float, exact to float rounding (the reference);
//   - int8 arithmetic: x rounded per 64 values to two int8 digits (15 bits, see Int8Row) and
//     multiplied with the packed weights as integers (Intel AMX tiles, AVX-512 VNNI / AVX-VNNI dpbusd,
//     AVX2 maddubs, or plain C++), as llama.cpp's q4 x q8 does with one digit:
//     sum_g scale_g * sum_blocks d (q_w . q_x) + bias_g * sum_g d q_x.
// It also holds a vectorized SiLU, the attention of decoding rows (one query per sequence), the
// causal softmax of prompt chunks' attention and the top-k of sampling.
// Output rows are shared out among a small thread pool that sleeps instead of spinning, in chunks
// claimed one at a time: a thread the OS takes away holds back one chunk, not a fixed share.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && \
    defined(__linux__)
#define LFM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

// ----------------------------------------------------------------------------------------------
// Threads

class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(i) for every i in [0, n), on the workers and the calling thread (only the calling thread when
  // the work is too small to be worth waking them: share = false).
  void run(int n, const std::function<void(int)>& fn, bool share = true) {
    std::unique_lock<std::mutex> busy(busy_, std::defer_lock);
    if (workers_.empty() || n < 2 || !share || !busy.try_lock()) {
      for (int i = 0; i < n; i++) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    drain(*job);
    if (job->finished.load() < n) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return job->finished.load() >= n; });
    }
    std::lock_guard<std::mutex> lock(mutex_);
    job_.reset();
  }

 private:
  struct Job {
    const std::function<void(int)>* fn;
    int n;
    std::atomic<int> next{0}, finished{0};
  };

  Pool() {
    int threads = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("LFM_MLX_THREADS")) threads = std::atoi(env);
    for (int i = 1; i < std::max(threads, 1); i++) workers_.emplace_back([this] { work(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void drain(Job& job) {
    int done = 0;
    for (int i; (i = job.next.fetch_add(1)) < job.n; done++) (*job.fn)(i);
    if (done && job.finished.fetch_add(done) + done == job.n) {
      std::lock_guard<std::mutex> lock(mutex_);
      done_.notify_all();
    }
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      // Products come in bursts (a decode step is ~60 of them, microseconds apart): wait a little
      // awake, then sleep, so an idle pool costs nothing to the other processes on the machine.
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load() == seen && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
        if (stop_) return;
        seen = generation_.load();
        job = job_;
      }
      if (job) drain(*job);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, busy_;
  std::condition_variable wake_, done_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
};

// ----------------------------------------------------------------------------------------------
// Float activations: the exact reference.

typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint8_t b8 __attribute__((vector_size(8)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline float sum8(f8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Weights i .. i + 7 of a packed row (low bits first), as floats.
template <int BITS>
inline f8 unpack(const uint8_t* row, int i) {
  if constexpr (BITS == 4) {
    uint32_t word;
    std::memcpy(&word, row + i / 2, 4);
    const u8v shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    return __builtin_convertvector((i8v)(((u8v){} + word >> shifts) & 15u), f8);
  } else {
    b8 bytes;
    std::memcpy(&bytes, row + i, 8);
    return __builtin_convertvector(__builtin_convertvector(bytes, i8v), f8);
  }
}

// y[r * N] for R <= 4 rows of x against one weight row; each row's arithmetic is the same whatever
// R is, so a row's result does not depend on the rows beside it.
template <int BITS, int R>
void float_rows(const float* x, const uint8_t* row, const float* scales, const float* biases,
                const float* xsum, float* y, int N, int K, int group_size) {
  const int G = K / group_size;
  f8 acc[R] = {};
  float offset[R] = {};
  for (int g = 0; g < G; g++) {
    f8 d0[R] = {}, d1[R] = {};  // two chains per row hide the multiply-add latency
    for (int k = g * group_size; k < (g + 1) * group_size; k += 16) {
      f8 q0 = unpack<BITS>(row, k), q1 = unpack<BITS>(row, k + 8);
      for (int r = 0; r < R; r++) {
        d0[r] += q0 * load8(x + (long)r * K + k);
        d1[r] += q1 * load8(x + (long)r * K + k + 8);
      }
    }
    for (int r = 0; r < R; r++) {
      acc[r] += scales[g] * (d0[r] + d1[r]);
      offset[r] += biases[g] * xsum[r * G + g];
    }
  }
  for (int r = 0; r < R; r++) y[(long)r * N] = sum8(acc[r]) + offset[r];
}

// ----------------------------------------------------------------------------------------------
// Int8 activations. A "chunk" is 32 bytes of a weight row: 64 weights at 4 bits, 32 at 8 bits. Its
// dot product with the int8 activations comes out as 8 int32 lanes of 4 bytes each: at 4 bits, lane l
// holds weights 8l .. 8l + 7 of the chunk (the low nibbles of bytes 4l .. 4l + 3 against the even
// activations, the high nibbles against the odd ones), at 8 bits weights 4l .. 4l + 3.

constexpr int BLOCK = 64;  // activations per int8 scale (one AMX tile row)

template <int BITS>
inline i8v dot_chunk(const uint8_t* w, const int8_t* xa, const int8_t* xb) {
#if defined(__AVX2__)
  __m256i bytes = _mm256_loadu_si256((const __m256i*)w), lo, hi = _mm256_setzero_si256();
  const __m256i a = _mm256_loadu_si256((const __m256i*)xa);
  __m256i b = a;
  if constexpr (BITS == 4) {
    const __m256i mask = _mm256_set1_epi8(15);
    lo = _mm256_and_si256(bytes, mask);
    hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    b = _mm256_loadu_si256((const __m256i*)xb);
  } else {
    lo = bytes;
  }
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  __m256i acc = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, a);
  if constexpr (BITS == 4) acc = _mm256_dpbusd_epi32(acc, hi, b);
#elif defined(__AVXVNNI__)
  __m256i acc = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, a);
  if constexpr (BITS == 4) acc = _mm256_dpbusd_avx_epi32(acc, hi, b);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc;
  if constexpr (BITS == 4) {  // 4-bit products fit 16 bits: add the two halves before widening
    acc = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, a), _mm256_maddubs_epi16(hi, b)), ones);
  } else {  // 255 * 127 * 2 overflows int16: split each byte into its nibbles
    const __m256i mask = _mm256_set1_epi8(15);
    __m256i l4 = _mm256_and_si256(lo, mask), h4 = _mm256_and_si256(_mm256_srli_epi16(lo, 4), mask);
    __m256i low = _mm256_madd_epi16(_mm256_maddubs_epi16(l4, a), ones);
    __m256i high = _mm256_madd_epi16(_mm256_maddubs_epi16(h4, a), ones);
    acc = _mm256_add_epi32(low, _mm256_slli_epi32(high, 4));
  }
#endif
  i8v out;
  std::memcpy(&out, &acc, sizeof out);
  return out;
#else
  i8v out = {};
  for (int l = 0; l < 8; l++) {
    int32_t s = 0;
    for (int j = 4 * l; j < 4 * l + 4; j++) {
      if constexpr (BITS == 4) {
        s += (w[j] & 15) * xa[j] + (w[j] >> 4) * xb[j];
      } else {
        s += w[j] * xa[j];
      }
    }
    out[l] = s;
  }
  return out;
#endif
}

// One row of x, ready for the int8 kernel: each value as two int8 digits of its 64-value block,
// x ~ d * (128 * q1 + q2) with d = max|x| / 127 / 128, q1 = round(x / (128 d)) and q2 the rounded
// rest in 128ths (|q2| <= 64). Each digit is one VNNI product; together they carry 15 bits, so the
// result is within float rounding of the exact product (one int8 digit alone changed the greedy
// token at 12% of positions of a random-weight 350M model).
struct Int8Row {
  std::vector<int8_t> a[2], b[2];  // per digit; 4 bits: even / odd activations; 8 bits: all in a
  std::vector<float> lanes;        // each lane's d, lane by lane as dot_chunk lays them out
  std::vector<float> xsum;         // sum of the rounded x per weight group, for the bias term
};

template <int BITS>
Int8Row quantize_row(const float* x, int K, int group_size) {
  Int8Row row;
  std::vector<int8_t> q[2] = {std::vector<int8_t>(K), std::vector<int8_t>(K)};
  const int lane_weights = BITS == 4 ? 8 : 4;
  row.lanes.resize(K / lane_weights);
  row.xsum.assign(K / group_size, 0.f);
  for (int k0 = 0; k0 < K; k0 += BLOCK) {
    float amax = 0;
    for (int k = k0; k < k0 + BLOCK; k++) amax = std::max(amax, std::fabs(x[k]));
    const float inv = amax > 0 ? 127 / amax : 0, d = amax / 127 / 128;
    for (int g0 = k0; g0 < k0 + BLOCK; g0 += std::min(group_size, BLOCK)) {  // a block may span groups
      int32_t sum = 0;
      for (int k = g0; k < g0 + std::min(group_size, BLOCK); k++) {
        const float t = x[k] * inv, q1 = std::nearbyint(t), q2 = std::nearbyint((t - q1) * 128);
        q[0][k] = static_cast<int8_t>(q1);
        q[1][k] = static_cast<int8_t>(q2);
        sum += 128 * q[0][k] + q[1][k];
      }
      // The bias term's sum is over the rounded activations too: the product is exactly that of the
      // rounded x with the dequantized weight, as the many-row path (lfm_mlx.quantized) computes it.
      row.xsum[g0 / group_size] += d * sum;
    }
    for (int k = k0; k < k0 + BLOCK; k += lane_weights) row.lanes[k / lane_weights] = d;
  }
  for (int digit = 0; digit < 2; digit++) {
    if constexpr (BITS == 4) {
      row.a[digit].resize(K / 2);
      row.b[digit].resize(K / 2);
      for (int j = 0; j < K / 2; j++) row.a[digit][j] = q[digit][2 * j], row.b[digit][j] = q[digit][2 * j + 1];
    } else {
      row.a[digit] = std::move(q[digit]);
    }
  }
  return row;
}

template <int BITS, int R>
void int8_rows(const Int8Row* xs, const uint8_t* row, const float* scales, const float* biases,
               float* y, int N, int K, int group_size) {
  constexpr int chunk_weights = BITS == 4 ? 64 : 32, lane_weights = chunk_weights / 8;
  const int G = K / group_size, chunks = K / chunk_weights;
  int c = 0;
  float total[R] = {};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // Two chunks (64 bytes) per step in 512-bit registers: half the instructions.
  {
    const int pair_groups = std::max(1, 2 * chunk_weights / group_size);
    const __mmask16 mask = (1 << pair_groups) - 1;
    alignas(64) int32_t lane_group[16];
    for (int l = 0; l < 16; l++) lane_group[l] = pair_groups > 1 ? l * lane_weights / group_size : 0;
    const __m512i groups = _mm512_load_si512(lane_group), nibble = _mm512_set1_epi8(15);
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (; c + 2 <= chunks; c += 2) {
      const __m512 scale = _mm512_permutexvar_ps(
          groups, _mm512_maskz_loadu_ps(mask, scales + c * chunk_weights / group_size));
      const __m512i bytes = _mm512_loadu_si512(row + c * 32);
      const __m512i lo = BITS == 4 ? _mm512_and_si512(bytes, nibble) : bytes;
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      for (int r = 0; r < R; r++) {
        __m512i digit[2];
        for (int i = 0; i < 2; i++) {
          digit[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xs[r].a[i].data() + c * 32));
          if constexpr (BITS == 4)
            digit[i] = _mm512_dpbusd_epi32(digit[i], hi, _mm512_loadu_si512(xs[r].b[i].data() + c * 32));
        }
        const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(digit[0], 7), digit[1]);
        const __m512 lanes = _mm512_mul_ps(scale, _mm512_loadu_ps(xs[r].lanes.data() + c * 8));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), lanes, acc[r]);
      }
    }
    for (int r = 0; r < R; r++) total[r] = _mm512_reduce_add_ps(acc[r]);
  }
#endif
  f8 acc[R] = {};
  for (; c < chunks; c++) {
    const int first = c * chunk_weights;
    f8 scale;  // each lane's weight scale
    if (group_size >= chunk_weights) {
      scale = f8{} + scales[first / group_size];
    } else {  // 4 bits, groups of 32: two groups per chunk
      const float s0 = scales[first / group_size], s1 = scales[first / group_size + 1];
      scale = f8{s0, s0, s0, s0, s1, s1, s1, s1};
    }
    const uint8_t* w = row + c * 32;
    for (int r = 0; r < R; r++) {
      const int8_t* b0 = BITS == 4 ? xs[r].b[0].data() + c * 32 : nullptr;
      const int8_t* b1 = BITS == 4 ? xs[r].b[1].data() + c * 32 : nullptr;
      i8v dot = (dot_chunk<BITS>(w, xs[r].a[0].data() + c * 32, b0) << 7) + dot_chunk<BITS>(w, xs[r].a[1].data() + c * 32, b1);
      acc[r] += __builtin_convertvector(dot, f8) * (scale * load8(xs[r].lanes.data() + c * 8));
    }
  }
  for (int r = 0; r < R; r++) {
    float offset = 0;
    for (int g = 0; g < G; g++) offset += biases[g] * xs[r].xsum[g];
    y[(long)r * N] = (total[r] + sum8(acc[r])) + offset;
  }
}


// ----------------------------------------------------------------------------------------------
// Int8 arithmetic on Intel AMX (Sapphire Rapids and later): the same digits, 16 x rows against 16
// weight rows per tile instruction. Where it runs, it takes every product of the int8 path, one row
// or a whole prompt: a row's arithmetic is the same whatever rows share its tiles.
//
// Per 64-value block (one activation scale, within one weight group): the two digits' tiles A1, A2
// (16 rows x 64 int8) times the weights' tile B (16 x 64 bytes: 16 weight rows, 4 codes each, as
// AMX's dot products read them) give two 16 x 16 int32 tiles C1, C2; then, in float,
// acc[m][n] += (128 C1 + C2)[m][n] * (scale[n][g] * d[m][block]), and at the end the bias term
// bias[n][g] * xsum[m][g]. The weights' K order inside a block follows their packing (at 4 bits the
// low nibbles' activations first, then the high nibbles'), and the activations are laid out alike.

#if LFM_AMX
// Linux hands out AMX's tile registers only to processes that ask (arch_prctl XCOMP_PERM).
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}
std::atomic<bool> amx_wanted{std::getenv("LFM_MLX_AMX") == nullptr || std::string(std::getenv("LFM_MLX_AMX")) != "0"};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Up to 8 rows, the two digits share one tile (rows 0 .. R-1 the first, R .. 2R-1 the second), and
// two sets of tiles take turns, so one block's product runs while the other's is read out:
// tiles 0, 3: C (2R x 16 int32); 1, 4: A (2R x 64 int8); 2, 5: B (16 x 64 bytes).
// From 9 to 16 rows: tiles 0, 1: C1, C2 (R x 16); 2, 3: A1, A2 (R x 64); 4: B.
void configure_tiles(int R) {
  thread_local int configured = 0;
  if (configured == R) return;
  TileConfig config;
  if (R <= 8) {
    for (int t : {0, 3}) config.rows[t] = 2 * R, config.colsb[t] = 64;
    for (int t : {1, 4}) config.rows[t] = 2 * R, config.colsb[t] = BLOCK;
    for (int t : {2, 5}) config.rows[t] = BLOCK / 4, config.colsb[t] = 64;
  } else {
    for (int t : {0, 1}) config.rows[t] = R, config.colsb[t] = 64;
    for (int t : {2, 3}) config.rows[t] = R, config.colsb[t] = BLOCK;
    config.rows[4] = BLOCK / 4, config.colsb[4] = 64;
  }
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes, which lets it drop the stores before.
  asm volatile("ldtilecfg %0" ::"m"(config));
  configured = R;
}

// acc[r] += (128 c1[r] + c2[r]) * scale * d[r]: one block's integer dots into the float sums.
template <int R>
inline void add_block(__m512* acc, const int32_t* c1, const int32_t* c2, __m512 scale, const float* d, int blocks) {
#pragma GCC unroll 16  // the sums stay in registers
  for (int r = 0; r < R; r++) {
    const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c1 + r * 16), 7),
                                         _mm512_load_si512(c2 + r * 16));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(d[r * blocks])), acc[r]);
  }
}

// R <= 16 rows of x (their digits in tile layout, a: [block][digit][R][BLOCK]) against 16 weight rows
// (b: blocks kb0 .. kb1 - 1, [block][BLOCK / 4][64]); d: [R][block]; the weights' scales and biases
// transposed, [group][16]. The sums carry over in partial from one range of blocks to the next; after
// the last block the bias term goes in and the 16 outputs of each row go to y.
template <int R>
void amx_tile(const int8_t* a, const uint8_t* b, const float* d, const float* scales_t, const float* biases_t,
              const float* xsum, float* y, int N, int blocks, int G, int blocks_per_group, int kb0, int kb1,
              float* partial) {
  configure_tiles(R);
  constexpr long a_block = 2L * R * BLOCK, b_block = BLOCK / 4 * 64;
  alignas(64) int32_t c[2][2 * R * 16];
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = kb0 ? _mm512_load_ps(partial + r * 16) : _mm512_setzero_ps();
  b -= kb0 * b_block;
  int kb = kb0;
  auto group = [=](int block) { return blocks_per_group == 1 ? block : block / blocks_per_group; };  // no idiv
  if constexpr (R <= 8) {
    for (; kb + 2 <= kb1; kb += 2) {
      _tile_zero(0);
      _tile_loadd(1, a + kb * a_block, BLOCK);
      _tile_loadd(2, b + kb * b_block, 64);
      _tile_dpbsud(0, 1, 2);
      _tile_zero(3);
      _tile_loadd(4, a + (kb + 1) * a_block, BLOCK);
      _tile_loadd(5, b + (kb + 1) * b_block, 64);
      _tile_dpbsud(3, 4, 5);
      _tile_stored(0, c[0], 64);
      add_block<R>(acc, c[0], c[0] + R * 16, _mm512_load_ps(scales_t + group(kb) * 16), d + kb, blocks);
      _tile_stored(3, c[1], 64);
      add_block<R>(acc, c[1], c[1] + R * 16, _mm512_load_ps(scales_t + group(kb + 1) * 16),
                   d + kb + 1, blocks);
    }
    for (; kb < kb1; kb++) {
      _tile_zero(0);
      _tile_loadd(1, a + kb * a_block, BLOCK);
      _tile_loadd(2, b + kb * b_block, 64);
      _tile_dpbsud(0, 1, 2);
      _tile_stored(0, c[0], 64);
      add_block<R>(acc, c[0], c[0] + R * 16, _mm512_load_ps(scales_t + group(kb) * 16), d + kb, blocks);
    }
  } else {
    for (; kb < kb1; kb++) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_loadd(2, a + kb * a_block, BLOCK);
      _tile_loadd(3, a + kb * a_block + R * BLOCK, BLOCK);
      _tile_loadd(4, b + kb * b_block, 64);
      _tile_dpbsud(0, 2, 4);
      _tile_dpbsud(1, 3, 4);
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      add_block<R>(acc, c[0], c[1], _mm512_load_ps(scales_t + group(kb) * 16), d + kb, blocks);
    }
  }
  if (kb1 < blocks) {
    for (int r = 0; r < R; r++) _mm512_store_ps(partial + r * 16, acc[r]);
    return;
  }
  for (int g = 0; g < G; g++) {
    const __m512 bias = _mm512_load_ps(biases_t + g * 16);
    for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(bias, _mm512_set1_ps(xsum[r * G + g]), acc[r]);
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(y + (long)r * N, acc[r]);
}

// 32 bytes of 16 weight rows (rows at stride row_bytes) into B tile rows at b: the 16 x 8 dwords
// transposed (dword j of every row side by side); at 4 bits (one block) row j takes their low nibbles
// and row 8 + j their high ones, at 8 bits (half a block) row j takes them as they are.
template <int BITS>
inline void weight_chunk(const uint8_t* w, long row_bytes, uint8_t* b) {
  __m512i z[8], t[8];
  for (int n = 0; n < 8; n++)
    z[n] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(w + n * row_bytes))),
                              _mm256_loadu_si256((const __m256i*)(w + (n + 8) * row_bytes)), 1);
  for (int n = 0; n < 8; n += 2) {
    t[n] = _mm512_unpacklo_epi32(z[n], z[n + 1]);
    t[n + 1] = _mm512_unpackhi_epi32(z[n], z[n + 1]);
  }
  for (int h = 0; h < 8; h += 4)
    for (int i = 0; i < 2; i++) {
      z[h + i] = _mm512_unpacklo_epi64(t[h + i], t[h + i + 2]);      // dword i of rows h.., per lane
      z[h + i + 2] = _mm512_unpackhi_epi64(t[h + i], t[h + i + 2]);  // dword i + 2
    }
  // z[0..3]: dwords 0, 2, 1, 3 (lanes: rows 0-3 of dwords j and j + 4, rows 8-11 of both); z[4..7]: rows 4-7, 12-15.
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  const int order[4] = {0, 2, 1, 3};
  for (int i = 0; i < 4; i++) {
    const int j = order[i];
    t[j] = _mm512_permutex2var_epi64(z[i], first, z[i + 4]);
    t[j + 4] = _mm512_permutex2var_epi64(z[i], second, z[i + 4]);
  }
  if constexpr (BITS == 4) {
    const __m512i nibble = _mm512_set1_epi8(15);
    for (int j = 0; j < 8; j++) {
      _mm512_store_si512(b + j * 64, _mm512_and_si512(t[j], nibble));
      _mm512_store_si512(b + (8 + j) * 64, _mm512_and_si512(_mm512_srli_epi16(t[j], 4), nibble));
    }
  } else {
    for (int j = 0; j < 8; j++) _mm512_store_si512(b + j * 64, t[j]);
  }
}

// dst[j][i] = src[i][j] for 16 rows i (at stride floats apart) and cols <= 16 columns j.
inline void transpose16(const float* src, long stride, int cols, float* dst) {
  const __mmask16 mask = (__mmask16)((1u << cols) - 1);
  __m512i r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(mask, src + i * stride));
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + k]: rows i .. i + 3 of column 4 L + k in 128-bit lane L
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; k++) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44), v1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44), v3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
    t[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[8 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int j = 0; j < cols; j++) _mm512_store_si512(dst + j * 16, t[j]);
}

// One block of 64 activations as Int8Row's two digits (the same arithmetic, vectorized), written in
// the weights' K order (at 4 bits the even activations, then the odd ones): digit 1 at q1, digit 2 at
// q2; its scale d and the sum of its rounded values (128 q1 + q2).
template <int BITS>
inline void quantize_block(const float* x, int8_t* q1, int8_t* q2, float& d, int32_t& sum) {
  __m512 v[4], top = _mm512_setzero_ps();
  for (int i = 0; i < 4; i++) {
    v[i] = _mm512_loadu_ps(x + 16 * i);
    top = _mm512_max_ps(top, _mm512_abs_ps(v[i]));
  }
  const float amax = _mm512_reduce_max_ps(top), inv = amax > 0 ? 127 / amax : 0;
  d = amax / 127 / 128;
  __m512i total = _mm512_setzero_si512();
  alignas(64) int8_t bytes[2][64];
  for (int i = 0; i < 4; i++) {
    const __m512 t = _mm512_mul_ps(v[i], _mm512_set1_ps(inv));
    const __m512 r1 = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r2 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, r1), _mm512_set1_ps(128.f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i i1 = _mm512_cvtps_epi32(r1), i2 = _mm512_cvtps_epi32(r2);
    total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(i1, 7), i2));
    _mm_store_si128((__m128i*)(bytes[0] + 16 * i), _mm512_cvtepi32_epi8(i1));
    _mm_store_si128((__m128i*)(bytes[1] + 16 * i), _mm512_cvtepi32_epi8(i2));
  }
  sum = _mm512_reduce_add_epi32(total);
  __m512i digits[2] = {_mm512_load_si512(bytes[0]), _mm512_load_si512(bytes[1])};
  if constexpr (BITS == 4) {  // even positions first, then odd ones
    alignas(64) static const uint8_t order[64] = {
        0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
        44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23,
        25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    const __m512i index = _mm512_load_si512(order);
    for (auto& digit : digits) digit = _mm512_permutexvar_epi8(index, digit);
  }
  _mm512_storeu_si512(q1, digits[0]);
  _mm512_storeu_si512(q2, digits[1]);
}

template <int BITS>
void qmm_amx(const float* x, const uint8_t* w, const float* scales, const float* biases, float* y, int M, int N,
             int K, int group_size) {
  const int blocks = K / BLOCK, G = K / group_size, tiles_m = (M + 15) / 16;
  const long row_bytes = (long)K * BITS / 8;
  // x's digits in tile layout, [m tile][block][digit][R rows][BLOCK] (R = 16 but in the last tile);
  // the scales d and the bias sums. Rows are shared out among the threads (a prompt's are many).
  std::vector<int8_t> a((size_t)M * blocks * 2 * BLOCK);
  std::vector<float> d((size_t)M * blocks), xsum((size_t)M * G, 0.f);
  auto quantize_rows = [&](int m0, int m1) {
    for (int m = m0; m < m1; m++) {
      const int R = std::min(16, M - m / 16 * 16);
      for (int kb = 0; kb < blocks; kb++) {
        int8_t* dst = a.data() + (size_t)(m / 16) * 16 * blocks * 2 * BLOCK + (size_t)kb * 2 * R * BLOCK + (m % 16) * BLOCK;
        int32_t sum;
        quantize_block<BITS>(x + (long)m * K + kb * BLOCK, dst, dst + R * BLOCK, d[(size_t)m * blocks + kb], sum);
        xsum[(size_t)m * G + kb * BLOCK / group_size] += d[(size_t)m * blocks + kb] * sum;
      }
    }
  };
  if (M < 8 || Pool::get().size() == 1) {
    quantize_rows(0, M);
  } else {
    const int chunk = std::max(1, M / (Pool::get().size() * 4));
    Pool::get().run((M + chunk - 1) / chunk, [&](int i) { quantize_rows(i * chunk, std::min(M, (i + 1) * chunk)); });
  }
  // Weight rows n0 .. n0 + 15 in tile layout (B: per block, BLOCK / 4 rows of 16 x 4 codes), then
  // against every tile of x; blocks ka0 .. ka1 - 1 of the weights' tiles t0 .. t1 - 1.
  const int tiles_n = N / 16;
  // Many rows: a range of blocks of every tile of x's digits is read once per 16 weight rows, so the
  // range is cut to keep it in L2 (1 MB); the sums of a tile of x carry over from one range to the
  // next in partials, one 16 x 16 per weight tile and x tile (block order, so results are unchanged).
  const long x_tile_block = 2L * 16 * BLOCK;
  const int x_range = std::max(1, std::min<int>(blocks, (1L << 20) / (tiles_m * x_tile_block)));
  std::vector<float> partials_buffer(x_range < blocks ? (size_t)tiles_n * tiles_m * 256 + 16 : 0);
  float* partials = reinterpret_cast<float*>(((uintptr_t)partials_buffer.data() + 63) & ~(uintptr_t)63);  // aligned loads
  auto weight_tiles = [&](int t0, int t1, int ka0, int ka1) {
    thread_local std::vector<uint8_t> buffer;  // B tiles, then the weight rows' scales and biases
    buffer.resize((size_t)K * 16 + (size_t)G * 16 * 2 * sizeof(float) + 64);
    uint8_t* b = reinterpret_cast<uint8_t*>(((uintptr_t)buffer.data() + 63) & ~(uintptr_t)63);
    float* scales_t = reinterpret_cast<float*>(b + (size_t)K * 16);
    float* biases_t = scales_t + (size_t)G * 16;
    alignas(64) float partial[16 * 16];
    // One tile of x: the weights' tiles a range of blocks at a time (16 KB, in L1 while used; 4 KB
    // beside 16 rows, whose digits fill most of L1); more tiles of x: all blocks of the range, each
    // tile reused by every tile of x.
    const bool few_rows = M <= 8;
    const int range = tiles_m > 1 ? ka1 - ka0 : few_rows ? 16 : 4;
    for (int t = t0; t < t1; t++) {
      const int n0 = t * 16;
      for (int g = 0; g < G; g += 16) {
        transpose16(scales + (long)n0 * G + g, G, std::min(16, G - g), scales_t + g * 16);
        transpose16(biases + (long)n0 * G + g, G, std::min(16, G - g), biases_t + g * 16);
      }
      for (int kb0 = ka0; kb0 < ka1; kb0 += range) {
        const int kb1 = std::min(ka1, kb0 + range);
        for (int c = kb0 * BITS / 4; c < kb1 * BITS / 4; c++) {  // 32 bytes: a block at 4 bits, half of one at 8
          weight_chunk<BITS>(w + n0 * row_bytes + c * 32, row_bytes, b + (long)(c - kb0 * BITS / 4) * (8 / BITS) * 8 * 64);
          // What comes next (these rows' next range of blocks, or the next 16 rows' first), a cache line
          // of each row at a time into L2: 16 streams are more than the hardware's prefetcher keeps
          // ahead of, and in L1 (but beside a few rows) they would push out the digits of x.
          const long ahead = kb1 < ka1 ? n0 * row_bytes + (c + (kb1 - kb0) * BITS / 4) * 32
                                       : (n0 + 16) * row_bytes + (c - (kb0 - ka0) * BITS / 4) * 32;
          if (c % 2 == 0 && (kb1 < ka1 || t + 1 < t1)) {  // (a prefetch past the end does no harm)
            for (int i = 0; i < 16; i++) {
              const char* line = (const char*)(w + ahead + i * row_bytes);
              few_rows ? _mm_prefetch(line, _MM_HINT_T0) : _mm_prefetch(line, _MM_HINT_T1);
            }
          }
        }
        for (int tm = 0; tm < tiles_m; tm++) {
          const int8_t* at = a.data() + (size_t)tm * blocks * 2 * 16 * BLOCK;
          const float *dt = d.data() + (size_t)tm * 16 * blocks, *xt = xsum.data() + (size_t)tm * 16 * G;
          float* yt = y + (long)tm * 16 * N + n0;
          float* pt = partials_buffer.empty() ? partial : partials + ((size_t)t * tiles_m + tm) * 256;
          switch (std::min(16, M - tm * 16)) {
#define TILE(R)                                                                                            \
  case R:                                                                                                  \
    amx_tile<R>(at, b, dt, scales_t, biases_t, xt, yt, N, blocks, G, group_size / BLOCK, kb0, kb1, pt); \
    break;
            TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
            TILE(9) TILE(10) TILE(11) TILE(12) TILE(13) TILE(14) TILE(15) TILE(16)
#undef TILE
          }
        }
      }
    }
  };
  Pool& pool = Pool::get();
  for (int ka0 = 0; ka0 < blocks; ka0 += x_range) {
    const int ka1 = std::min(blocks, ka0 + x_range);
    if (pool.size() == 1 || (long)N * K * tiles_m < (1L << 18)) {
      weight_tiles(0, tiles_n, ka0, ka1);
      continue;
    }
    const int chunk = std::max(1, tiles_n / (pool.size() * 16));
    pool.run((tiles_n + chunk - 1) / chunk, [&](int i) { weight_tiles(i * chunk, std::min(tiles_n, (i + 1) * chunk), ka0, ka1); });
  }
}

bool amx_applies(int N, int K, int group_size) {
  return amx_wanted.load() && amx_permitted() && N % 16 == 0 && group_size >= BLOCK;
}
#endif

// ----------------------------------------------------------------------------------------------
// The product over all rows, shared among threads.

template <int BITS>
void qmm(const float* x, const uint8_t* w, const float* scales, const float* biases, float* y, int M,
         int N, int K, int group_size, bool int8) {
  const int G = K / group_size;
  const long row_bytes = (long)K * BITS / 8;
  std::vector<float> xsum;
  std::vector<Int8Row> xq;
  if (int8) {
#if LFM_AMX
    if (amx_applies(N, K, group_size)) return qmm_amx<BITS>(x, w, scales, biases, y, M, N, K, group_size);
#endif
    for (int m = 0; m < M; m++) xq.push_back(quantize_row<BITS>(x + (long)m * K, K, group_size));
  } else {
    xsum.assign((size_t)M * G, 0.f);
    for (int m = 0; m < M; m++)
      for (int g = 0; g < G; g++) {
        f8 t = {};
        for (int k = 0; k < group_size; k += 8) t += load8(x + (long)m * K + g * group_size + k);
        xsum[m * G + g] = sum8(t);
      }
  }
  // Weight rows [n0, n1) against every row of x, four x rows at a time: the weight rows stay in
  // cache while x streams past them once.
  auto weight_rows = [&](int n0, int n1) {
    for (int m = 0; m < M; m += 4) {
      const int r = std::min(M - m, 4);
      for (int n = n0; n < n1; n++) {
        const uint8_t* row = w + n * row_bytes;
        const float *s = scales + (long)n * G, *b = biases + (long)n * G;
        float* ym = y + (long)m * N + n;
#define ROWS(R)                                                                               \
  int8 ? int8_rows<BITS, R>(xq.data() + m, row, s, b, ym, N, K, group_size)                   \
       : float_rows<BITS, R>(x + (long)m * K, row, s, b, xsum.data() + m * G, ym, N, K, group_size)
        switch (r) {
          case 1: ROWS(1); break;
          case 2: ROWS(2); break;
          case 3: ROWS(3); break;
          default: ROWS(4);
        }
#undef ROWS
      }
    }
  };
  Pool& pool = Pool::get();
  // Chunks of rows: enough of them that a late thread's last one is a small part of the product.
  const long work = (long)N * K * ((M + 3) / 4);
  if (pool.size() == 1 || work < (1L << 18)) {
    weight_rows(0, N);
    return;
  }
  const int chunk = std::max(8, N / (pool.size() * 16));
  pool.run((N + chunk - 1) / chunk, [&](int i) { weight_rows(i * chunk, std::min(N, (i + 1) * chunk)); });
}

// The primitives' inputs, row-major: as they are, or copied when MLX hands over a strided view (a slice,
// a transpose). Copying here rather than with mx::contiguous keeps a product one node of the graph:
// each node costs a few microseconds of scheduling, and a decode step has ~90 products.
template <typename T>
struct RowMajor {
  std::vector<T> copy;
  const T* data;
  explicit RowMajor(const mx::array& a) : data(a.data<T>()) {
    if (a.flags().row_contiguous) return;
    copy.resize(a.size());
    for (size_t i = 0; i < a.size(); i++) copy[i] = data[mx::elem_to_loc(static_cast<int>(i), a)];
    data = copy.data();
  }
};

// ----------------------------------------------------------------------------------------------
// The primitive.

class QuantizedMatmul : public mx::Primitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits, bool int8)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits), int8_(int8) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto &x = inputs[0], &w = inputs[1], &scales = inputs[2], &biases = inputs[3];
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    const int K = x.shape(-1), M = static_cast<int>(x.size() / K), N = w.shape(0);
    encoder.dispatch([x, w, scales, biases, y = out.data<float>(), M, N, K, group_size = group_size_,
                      bits = bits_, int8 = int8_]() {
      RowMajor<float> xs(x), s(scales), b(biases);
      RowMajor<uint32_t> ws(w);
      auto codes = reinterpret_cast<const uint8_t*>(ws.data);
      if (bits == 4) {
        qmm<4>(xs.data, codes, s.data, b.data, y, M, N, K, group_size, int8);
      } else {
        qmm<8>(xs.data, codes, s.data, b.data, y, M, N, K, group_size, int8);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("lfm_mlx's quantized_matmul runs on the CPU only; use mx.quantized_matmul on a GPU");
  }

  const char* name() const override { return "LfmQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && int8_ == o.int8_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

 private:
  int group_size_, bits_;
  bool int8_;
};

// The weight as float32 (w = scale * q + bias), for the many-row path's BLAS product: MLX's own
// dequantization is several times slower on the CPU and would cost as much as the product itself.
class Dequantize : public mx::Primitive {
 public:
  Dequantize(mx::Stream stream, int group_size, int bits)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto &w = inputs[0], &scales = inputs[1], &biases = inputs[2];
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    const int N = out.shape(0), K = out.shape(1);
    encoder.dispatch([w_array = w, scales, biases, y = out.data<float>(), N, K, group_size = group_size_,
                      bits = bits_]() {
      RowMajor<uint32_t> ws(w_array);
      RowMajor<float> ss(scales), bs(biases);
      auto w = reinterpret_cast<const uint8_t*>(ws.data);
      const float *s = ss.data, *b = bs.data;
      const int G = K / group_size, chunk = std::max(1, (1 << 16) / K);
      Pool::get().run((N + chunk - 1) / chunk, [&](int i) {
        for (int n = i * chunk; n < std::min(N, (i + 1) * chunk); n++) {
          const uint8_t* row = w + (long)n * K * bits / 8;
          float* out_row = y + (long)n * K;
          for (int k = 0; k < K; k += 8) {
            const float scale = s[(long)n * G + k / group_size], bias = b[(long)n * G + k / group_size];
            f8 v = (bits == 4 ? unpack<4>(row, k) : unpack<8>(row, k)) * scale + bias;
            std::memcpy(out_row + k, &v, sizeof v);
          }
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("lfm_mlx's dequantize runs on the CPU only; use mx.dequantize on a GPU");
  }

  const char* name() const override { return "LfmDequantize"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Dequantize&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1) * 32 / bits_}};
  }

 private:
  int group_size_, bits_;
};

// The output allocated, and input and output registered with the stream's CPU encoder, which the
// one-input primitives below then dispatch their work on.
mx::cpu::CommandEncoder& unary_encoder(mx::Stream stream, const mx::array& x, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  return encoder;
}

// SiLU, x / (1 + e^-x), vectorized: MLX's CPU exp is a scalar loop (~11 ns per value on x86-64), which
// made the MLP's activation a fifth of a 512-token prefill.
inline f8 exp8(f8 x) {
  // e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln 2 / 2; e^r by its degree-6 Taylor polynomial
  // (relative error < 2e-7 there), 2^n by building the float's exponent bits.
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const f8 n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23
  const f8 r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  f8 p = f8{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const i8v bits = (__builtin_convertvector(n, i8v) + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

class Silu : public mx::UnaryPrimitive {
 public:
  explicit Silu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& x = inputs[0];
    auto& encoder = unary_encoder(stream(), x, out);
    encoder.dispatch([x, y = out.data<float>(), size = (long)out.size()]() {
      RowMajor<float> xs(x);
      const long chunk = 1 << 14, head = size / 8 * 8;
      auto part = [&](int i) {
        for (long k = i * chunk; k < std::min(head, (i + 1) * chunk); k += 8) {
          const f8 v = load8(xs.data + k), out = v < -87.f ? f8{} : v / (1.f + exp8(-v));  // e^-v overflows
          std::memcpy(y + k, &out, sizeof out);
        }
      };
      const int parts = static_cast<int>((head + chunk - 1) / chunk);
      Pool::get().run(parts, part, size >= (1L << 16));
      for (long k = head; k < size; k++) y[k] = xs.data[k] / (1.f + std::exp(-xs.data[k]));
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lfm_mlx's silu runs on the CPU only; use nn.silu on a GPU");
  }

  const char* name() const override { return "LfmSilu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

mx::array silu(const mx::array& x, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu || x.dtype() != mx::float32)
    throw std::invalid_argument("silu: float32 on a CPU stream only");
  return mx::array(x.shape(), mx::float32, std::make_shared<Silu>(stream), {x});
}


// RMSNorm over the last axis, x * (1 / sqrt(mean(x^2) + eps)) * weight, as MLX computes it, in one node:
// MLX's CPU rms_norm is six (square, mean, add, rsqrt, two products), a step's largest share of nodes.
class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto &x = inputs[0], &weight = inputs[1];
    auto& encoder = unary_encoder(stream(), x, out);
    encoder.set_input_array(weight);
    encoder.dispatch([x, weight, y = out.data<float>(), eps = eps_]() {
      RowMajor<float> xs(x), ws(weight);
      const int D = x.shape(-1), head = D / 8 * 8;
      const long rows = D ? (long)x.size() / D : 0, chunk = std::max(1L, (1L << 14) / std::max(D, 1));
      auto part = [&](int i) {
        for (long r = i * chunk; r < std::min(rows, (i + 1) * chunk); r++) {
          const float* xr = xs.data + r * D;
          float* yr = y + r * D;
          f8 acc = {};
          for (int d = 0; d < head; d += 8) {
            const f8 v = load8(xr + d);
            acc += v * v;
          }
          float squares = sum8(acc);
          for (int d = head; d < D; d++) squares += xr[d] * xr[d];
          const float scale = 1.f / std::sqrt(squares / D + eps);
          for (int d = 0; d < head; d += 8) {
            const f8 o = (load8(xr + d) * scale) * load8(ws.data + d);
            std::memcpy(yr + d, &o, sizeof o);
          }
          for (int d = head; d < D; d++) yr[d] = (xr[d] * scale) * ws.data[d];
        }
      };
      Pool::get().run(static_cast<int>((rows + chunk - 1) / chunk), part, (long)x.size() >= (1L << 16));
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lfm_mlx's rms_norm runs on the CPU only; use mx.fast.rms_norm on a GPU");
  }

  const char* name() const override { return "LfmRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float eps_;
};

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu || x.dtype() != mx::float32 || weight.dtype() != mx::float32 ||
      x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: float32 x [..., D] and weight [D], on a CPU stream only");
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, eps), {x, weight});
}

// RoPE (the halves form, not "traditional") of x [B, H, T, D], position t + offset of row b, as MLX's
// fallback computes it (positions * scale times base^(-i / (dims / 2)), then cos and sin): one node
// where that fallback makes thirty, two of them in every attention layer of a step.
class Rope : public mx::Primitive {
 public:
  Rope(mx::Stream stream, int dims, float base, float scale, int offset)
      : mx::Primitive(stream), dims_(dims), base_(base), scale_(scale), offset_(offset) {}

  // inputs: x, then optionally an int32 offset per row (shape [] or [B]) that replaces offset_.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& x = inputs[0];
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([inputs, y = out.data<float>(), dims = dims_, base = base_, scale = scale_, offset = offset_]() {
      auto& x = inputs[0];
      RowMajor<float> xs(x);
      const int B = x.shape(0), H = x.shape(1), T = x.shape(2), D = x.shape(3), half = dims / 2;
      std::vector<int> offsets(B, offset);
      if (inputs.size() > 1) {
        RowMajor<int32_t> given(inputs[1]);
        for (int b = 0; b < B; b++) offsets[b] = given.data[inputs[1].size() == 1 ? 0 : b];
      }
      const float step = static_cast<float>(std::log(base) / half);
      std::vector<float> inv(half), cosines((size_t)B * T * half), sines((size_t)B * T * half);
      for (int i = 0; i < half; i++) inv[i] = std::exp(static_cast<float>(-i) * step);
      for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
          const float position = static_cast<float>(t + offsets[b]) * scale;
          for (int i = 0; i < half; i++) {
            const float theta = position * inv[i];
            cosines[((size_t)b * T + t) * half + i] = std::cos(theta);
            sines[((size_t)b * T + t) * half + i] = std::sin(theta);
          }
        }
      auto part = [&](int task) {  // one (b, h): its T rows
        const int b = task / H;
        for (int t = 0; t < T; t++) {
          const size_t row = ((size_t)task * T + t) * D;
          const float *in = xs.data + row, *c = cosines.data() + ((size_t)b * T + t) * half,
                      *sn = sines.data() + ((size_t)b * T + t) * half;
          float* o = y + row;
          for (int i = 0; i < half; i++) {
            const float x1 = in[i], x2 = in[half + i];
            o[i] = x1 * c[i] - x2 * sn[i];
            o[half + i] = x1 * sn[i] + x2 * c[i];
          }
          for (int d = dims; d < D; d++) o[d] = in[d];
        }
      };
      Pool::get().run(B * H, part, (long)x.size() >= (1L << 16));
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("lfm_mlx's rope runs on the CPU only; use mx.fast.rope on a GPU");
  }

  const char* name() const override { return "LfmRope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && base_ == o.base_ && scale_ == o.scale_ && offset_ == o.offset_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  int dims_;
  float base_, scale_;
  int offset_;
};

mx::array rope(const mx::array& x, int dims, float base, float scale, int offset, std::optional<mx::array> offsets,
               mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu || x.dtype() != mx::float32 || x.ndim() != 4 || dims <= 0 || dims % 2 ||
      dims > x.shape(3))
    throw std::invalid_argument("rope: float32 x [B, H, T, D], even dims <= D, on a CPU stream only");
  std::vector<mx::array> inputs = {x};
  if (offsets) {
    if (offsets->ndim() > 1 || (offsets->size() != 1 && offsets->size() != (size_t)x.shape(0)) ||
        !mx::issubdtype(offsets->dtype(), mx::integer))
      throw std::invalid_argument("rope: offsets are integers, one or one per row of x");
    inputs.push_back(mx::astype(*offsets, mx::int32, stream));
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream, dims, base, scale, offset), inputs);
}

// ----------------------------------------------------------------------------------------------
// Attention of one new token per sequence, for many sequences at once: each query row against its own
// sequence's keys and values (other buffers, other lengths), after writing the row's new key and value
// into them. MLX's CPU attention for one query is a handful of graph nodes per sequence and layer
// (~0.2 ms at 300 keys), and each cache write two more; a batch of 16 decoding rows spent more time
// there than in its products. One node here, with the rows' heads shared out among the threads.

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream stream, float scale, std::vector<int> lengths)
      : mx::Primitive(stream), scale_(scale), lengths_(std::move(lengths)) {}

  // inputs: q [B, H, 1, D], the new keys and values [B, Hkv, 1, D], then B key buffers and B value
  // buffers [1, Hkv, capacity, D]. Row i attends to lengths[i] keys, the last its new one, written at
  // position lengths[i] - 1. outputs: the attention [B, H, 1, D], then the buffers with the new token
  // written, in the inputs' memory (a copy only where an input is not dense): the caller is a KV cache
  // that alone holds its buffers and takes the outputs in their place, so that whatever reads them
  // later comes after this node. (MLX's donation cannot tell: every output of a node holds its inputs.)
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) encoder.set_input_array(a);
    for (auto& a : outputs) encoder.set_output_array(a);
    std::vector<mx::array> buffers, sources;  // sources: inputs to copy into their outputs first
    std::vector<int> copied;
    for (size_t j = 3; j < inputs.size(); j++) {
      auto& buffer = outputs[j - 2];
      if (inputs[j].flags().row_contiguous && inputs[j].data_size() == inputs[j].size()) {
        buffer.copy_shared_buffer(inputs[j]);
      } else {
        buffer.set_data(mx::allocator::malloc(buffer.nbytes()));
        sources.push_back(inputs[j]);
        copied.push_back(static_cast<int>(j - 3));
      }
      buffers.push_back(buffer);
    }
    encoder.dispatch([inputs, buffers, sources, copied, lengths = lengths_, y = out.data<float>(), scale = scale_]() mutable {
      const int B = inputs[0].shape(0), H = inputs[0].shape(1), D = inputs[0].shape(3);
      const int Hkv = inputs[1].shape(1), group = H / Hkv;
      for (size_t c = 0; c < sources.size(); c++) {
        RowMajor<float> source(sources[c]);
        std::memcpy(buffers[copied[c]].data<float>(), source.data, buffers[copied[c]].nbytes());
      }
      RowMajor<float> q(inputs[0]), new_keys(inputs[1]), new_values(inputs[2]);
      long work = 0;
      for (int i = 0; i < B; i++) {
        for (int h = 0; h < Hkv; h++) {
          const long at = ((long)h * buffers[i].shape(2) + lengths[i] - 1) * D, from = ((long)i * Hkv + h) * D;
          std::memcpy(buffers[i].data<float>() + at, new_keys.data + from, D * sizeof(float));
          std::memcpy(buffers[B + i].data<float>() + at, new_values.data + from, D * sizeof(float));
        }
        work += (long)lengths[i] * H * D;
      }
      auto head = [&](int task) {  // one sequence's kv head and the query heads that share it
        const int i = task / Hkv, h = task % Hkv, L = lengths[i];
        const long head_stride = (long)buffers[i].shape(2) * D;
        const float *k = buffers[i].data<float>() + h * head_stride, *v = buffers[B + i].data<float>() + h * head_stride;
        std::vector<float> p(L);
        for (int g = 0; g < group; g++) {
          const float* qh = q.data + ((long)i * H + h * group + g) * D;
          float top = -INFINITY;
          for (int j = 0; j < L; j++) {
            f8 acc = {};
            for (int d = 0; d < D; d += 8) acc += load8(qh + d) * load8(k + (long)j * D + d);
            p[j] = sum8(acc) * scale;
            top = std::max(top, p[j]);
          }
          float total = 0;
          int j = 0;
          for (; j + 8 <= L; j += 8) {
            const f8 e = exp8(load8(p.data() + j) - top);
            std::memcpy(p.data() + j, &e, sizeof e);
            total += sum8(e);
          }
          for (; j < L; j++) total += (p[j] = std::exp(p[j] - top));
          f8 acc[16] = {};  // D <= 128
          for (int t = 0; t < L; t++)
            for (int c = 0; c < D / 8; c++) acc[c] += p[t] * load8(v + (long)t * D + c * 8);
          float* yh = y + ((long)i * H + h * group + g) * D;
          for (int c = 0; c < D / 8; c++) {
            const f8 o = acc[c] / total;
            std::memcpy(yh + c * 8, &o, sizeof o);
          }
        }
      };
      Pool::get().run(B * Hkv, head, work >= (1L << 16));
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("lfm_mlx's decode_attention runs on the CPU only");
  }

  const char* name() const override { return "LfmDecodeAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && lengths_ == o.lengths_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    std::vector<mx::Shape> shapes = {inputs[0].shape()};
    for (size_t j = 3; j < inputs.size(); j++) shapes.push_back(inputs[j].shape());
    return shapes;
  }

 private:
  float scale_;
  std::vector<int> lengths_;
};


// See DecodeAttention: returns the attention, then the B key buffers and the B value buffers.
std::vector<mx::array> decode_attention(const mx::array& q, const mx::array& new_keys,
                                                 const mx::array& new_values, const std::vector<mx::array>& keys,
                                                 const std::vector<mx::array>& values, const std::vector<int>& lengths,
                                                 float scale, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("decode_attention: CPU streams only");
  const int B = q.ndim() == 4 ? q.shape(0) : 0;
  if (q.dtype() != mx::float32 || q.ndim() != 4 || q.shape(2) != 1 || q.shape(3) % 8 != 0 || q.shape(3) > 128 ||
      B == 0 || (int)keys.size() != B || (int)values.size() != B || (int)lengths.size() != B)
    throw std::invalid_argument("decode_attention: float32 q [B, H, 1, D] and B buffers and lengths");
  const int Hkv = keys[0].ndim() == 4 ? keys[0].shape(1) : 0, D = q.shape(3);
  for (auto* a : {&new_keys, &new_values})
    if (a->dtype() != mx::float32 || a->shape() != mx::Shape{B, Hkv, 1, D})
      throw std::invalid_argument("decode_attention: new keys and values float32 [B, Hkv, 1, D]");
  std::vector<mx::array> inputs = {q, new_keys, new_values};
  std::vector<mx::Shape> shapes = {q.shape()};
  for (auto* list : {&keys, &values})
    for (int i = 0; i < B; i++) {
      auto& a = (*list)[i];
      if (a.dtype() != mx::float32 || a.ndim() != 4 || a.shape(0) != 1 || a.shape(1) != Hkv || a.shape(3) != D ||
          Hkv == 0 || q.shape(1) % Hkv != 0 || lengths[i] < 1 || lengths[i] > a.shape(2))
        throw std::invalid_argument("decode_attention: buffers float32 [1, Hkv, capacity >= length, D]");
      inputs.push_back(a);
      shapes.push_back(a.shape());
    }
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(2 * B + 1, mx::float32),
                                std::make_shared<DecodeAttention>(stream, scale, lengths), std::move(inputs));
}

// ----------------------------------------------------------------------------------------------
// Softmax of a prompt chunk's attention scores under the causal mask, for MLX's CPU backend: MLX's
// exp there is a scalar loop (~11 ns a value), which made a 512-token chunk's attention ten times its
// two matrix products (BLAS, left to MLX). Row i of the last-but-one axis sees keys 0 .. offset + i;
// the rest of its row is zero.

class CausalSoftmax : public mx::UnaryPrimitive {
 public:
  CausalSoftmax(mx::Stream stream, float scale, int offset) : mx::UnaryPrimitive(stream), scale_(scale), offset_(offset) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& x = inputs[0];
    auto& encoder = unary_encoder(stream(), x, out);
    encoder.dispatch([x, y = out.data<float>(), scale = scale_, offset = offset_]() {
      RowMajor<float> xs(x);
      const int S = x.shape(-1), L = x.shape(-2);
      const long rows = (long)(x.size() / S);
      auto row = [&](long r) {
        const float* in = xs.data + r * S;
        float* o = y + r * S;
        const int n = std::min<long>(S, offset + r % L + 1);
        float top = -INFINITY;
        for (int j = 0; j < n; j++) top = std::max(top, in[j]);
        const f8 shift = f8{} + top * scale;
        f8 total8 = {};
        int j = 0;
        for (; j + 8 <= n; j += 8) {
          const f8 e = exp8(load8(in + j) * scale - shift);
          std::memcpy(o + j, &e, sizeof e);
          total8 += e;
        }
        float total = sum8(total8);
        for (; j < n; j++) total += (o[j] = std::exp(in[j] * scale - top * scale));
        const float inv = 1.f / total;
        for (j = 0; j + 8 <= n; j += 8) {
          const f8 p = load8(o + j) * inv;
          std::memcpy(o + j, &p, sizeof p);
        }
        for (; j < n; j++) o[j] *= inv;
        std::fill(o + n, o + S, 0.f);
      };
      const long per_part = std::max(1L, (1L << 15) / S);
      const int parts = static_cast<int>((rows + per_part - 1) / per_part);
      auto part = [&](int i) {
        for (long r = i * per_part; r < std::min(rows, (i + 1) * per_part); r++) row(r);
      };
      Pool::get().run(parts, part, (long)x.size() >= (1L << 16));
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lfm_mlx's causal_softmax runs on the CPU only");
  }

  const char* name() const override { return "LfmCausalSoftmax"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CausalSoftmax&>(other);
    return scale_ == o.scale_ && offset_ == o.offset_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float scale_;
  int offset_;
};

mx::array causal_softmax(const mx::array& scores, float scale, int offset, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu || scores.dtype() != mx::float32 || scores.ndim() < 2 || offset < 0 ||
      !(scale > 0))
    throw std::invalid_argument("causal_softmax: float32 scores [..., L, S] on a CPU stream, scale > 0, offset >= 0");
  return mx::array(scores.shape(), mx::float32, std::make_shared<CausalSoftmax>(stream, scale, offset), {scores});
}

// ----------------------------------------------------------------------------------------------
// The indices of each row's k largest values (in index order), for top-k sampling: MLX's CPU
// argpartition over a 65k vocabulary costs ~0.5 ms a row, a twentieth of a 16-row decode step.

class TopK : public mx::UnaryPrimitive {
 public:
  TopK(mx::Stream stream, int k) : mx::UnaryPrimitive(stream), k_(k) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& x = inputs[0];
    auto& encoder = unary_encoder(stream(), x, out);
    encoder.dispatch([x, y = out.data<uint32_t>(), k = k_]() {
      RowMajor<float> xs(x);
      const int V = x.shape(-1), rows = static_cast<int>(x.size() / V);
      auto row = [&](int r) {
        const float* in = xs.data + (long)r * V;
        uint32_t* o = y + (long)r * k;
        std::vector<float> copy(in, in + V);
        for (float& v : copy) v = std::isnan(v) ? -INFINITY : v;
        std::nth_element(copy.begin(), copy.begin() + (k - 1), copy.end(), std::greater<float>());
        const float kth = copy[k - 1];
        int n = 0;
        for (int j = 0; j < V; j++)  // fewer than k lie above the k-th; then its ties, first ones first
          if (in[j] > kth) o[n++] = j;
        for (int j = 0; j < V && n < k; j++)
          if (in[j] == kth || (std::isnan(in[j]) && kth == -INFINITY)) o[n++] = j;
        std::sort(o, o + k);
      };
      Pool::get().run(rows, row);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lfm_mlx's top_k runs on the CPU only; use mx.argpartition on a GPU");
  }

  const char* name() const override { return "LfmTopK"; }
  bool is_equivalent(const mx::Primitive& other) const override { return k_ == static_cast<const TopK&>(other).k_; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = k_;
    return {shape};
  }

 private:
  int k_;
};

mx::array top_k(const mx::array& x, int k, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu || x.dtype() != mx::float32 || x.ndim() < 1 || k < 1 || k > x.shape(-1))
    throw std::invalid_argument("top_k: float32 rows on a CPU stream and 1 <= k <= their length");
  auto shape = x.shape();
  shape.back() = k;
  return mx::array(shape, mx::uint32, std::make_shared<TopK>(stream, k), {x});
}

void check_weights(const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
                   int bits, int K) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("bits must be 4 or 8");
  if (scales.dtype() != mx::float32 || biases.dtype() != mx::float32 || w.dtype() != mx::uint32)
    throw std::invalid_argument("float32 scales and biases and uint32 weights only");
  if (w.ndim() != 2 || K != w.shape(1) * 32 / bits || group_size % 16 != 0 || K % group_size != 0 ||
      scales.shape() != mx::Shape{w.shape(0), K / group_size} || biases.shape() != scales.shape())
    throw std::invalid_argument("the shapes do not agree: inputs of width " + std::to_string(K) +
                                " against w " + std::to_string(w.ndim() == 2 ? w.shape(1) * 32 / bits : 0) +
                                " wide, group size " + std::to_string(group_size) + ", and its scales and biases");
}

mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
                     int bits, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("dequantize: CPU streams only");
  const int K = w.ndim() == 2 ? w.shape(1) * 32 / bits : 0;
  check_weights(w, scales, biases, group_size, bits, K);
  return mx::array({w.shape(0), K}, mx::float32, std::make_shared<Dequantize>(stream, group_size, bits),
                   {w, scales, biases});
}

bool int8_supported(int bits, int K, int group_size) {
  return (group_size == 32 || group_size == 64 || group_size == 128) && K % BLOCK == 0;
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool int8_activations,
                           mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("quantized_matmul: CPU streams only");
  if (x.dtype() != mx::float32 || x.ndim() < 1) throw std::invalid_argument("quantized_matmul: float32 x only");
  const int K = x.shape(-1), N = w.ndim() == 2 ? w.shape(0) : 0;
  check_weights(w, scales, biases, group_size, bits, K);
  auto out_shape = x.shape();
  out_shape.back() = N;
  return mx::array(
      out_shape, mx::float32,
      std::make_shared<QuantizedMatmul>(stream, group_size, bits, int8_activations && int8_supported(bits, K, group_size)),
      {x, w, scales, biases});
}

}  // namespace

NB_MODULE(_qmm, m) {
  m.doc() = "lfm_mlx's quantized product for MLX's CPU backend";
  m.def("quantized_matmul", &quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, "int8_activations"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x @ dequantize(w, scales, biases).T for float32 x and affine 4/8-bit w, on the CPU.");
  m.def("dequantize", &dequantize, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a, nb::kw_only(),
        "stream"_a = nb::none(), "The float32 weight of affine 4/8-bit w, on the CPU.");
  m.def("silu", &silu, "x"_a, nb::kw_only(), "stream"_a = nb::none(), "x * sigmoid(x) for float32 x, on the CPU.");
  m.def("rope", &rope, "x"_a, "dims"_a, "base"_a, "scale"_a, "offset"_a, "offsets"_a = nb::none(), nb::kw_only(),
        "stream"_a = nb::none(), "RoPE (halves form) of float32 x [B, H, T, D] at positions t + offset (or offsets[b]).");
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x / sqrt(mean(x^2, last axis) + eps) * weight for float32 x, on the CPU.");
  m.def("decode_attention", &decode_attention, "q"_a, "new_keys"_a, "new_values"_a, "keys"_a, "values"_a,
        "lengths"_a, "scale"_a, nb::kw_only(), "stream"_a = nb::none(),
        "softmax(q K^T * scale) V for one query row per sequence against its own buffers, after writing its new "
        "key and value at lengths[i] - 1: [out, *keys, *values].");
  m.def("causal_softmax", &causal_softmax, "scores"_a, "scale"_a, "offset"_a, nb::kw_only(), "stream"_a = nb::none(),
        "softmax(scores * scale) over the last axis, row i of the axis before seeing keys 0 .. offset + i.");
  m.def("top_k", &top_k, "x"_a, "k"_a, nb::kw_only(), "stream"_a = nb::none(),
        "The indices of the k largest values of each row of float32 x, in index order (NaN counts as -inf).");
  m.def("int8_supported", &int8_supported, "bits"_a, "K"_a, "group_size"_a,
        "Whether int8 activations apply to this shape (else the float kernel runs).");
  m.def("threads", [] { return Pool::get().size(); }, "Threads that share each product.");
  m.def(
      "amx",
      [](std::optional<bool> enable) {
#if LFM_AMX
        if (enable) amx_wanted = *enable;
        return amx_wanted.load() && amx_permitted();
#else
        return false;
#endif
      },
      "enable"_a = nb::none(),
      "Whether the int8 path runs on Intel AMX tiles (where the CPU and OS allow); enable=False/True switches.");
}
