// Standalone compile check and self-test of delta_linear.cu, without torch.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -o check_delta_linear \
//        cuda/check_standalone.cu
//   ./check_delta_linear           correctness sweep against a float64 CPU reference (needs a GPU)
//   ./check_delta_linear --bench   timings on Llama-7B-shaped banks
//   ./check_delta_linear --fused [K [one-hot]]   the fused form (base product + delta) per call on those banks, 1
//                                      row, with and without U by block column (K deltas a bank, weighted 1 / K or
//                                      one of them alone; default 1)
//   ./check_delta_linear --layer [K]   the four fused calls of a layer in turn, 32 layers, against the sum of each
//                                      call alone, with an empty bank, U by block column and U by row
//   ./check_delta_linear --fused-cases   the correctness sweep's fused-form cases only
//   ./check_delta_linear --trace [K]   built with -DDELTACOMP_ROW_TRACE: each one-row call's phases (%globaltimer
//                                      stamps of every CTA) in a layer's sequence and alone, K deltas a bank, and
//                                      the CTAs' shares, stage-1 rows and SMs
//   ./check_delta_linear --stages [R [K [row_tile [P]]]]   each kernel of the two-kernel op timed alone on the q|k|v
//                                      bank, or its first P projections (P = 1: q alone, a bank as the torch
//                                      benchmarks lay out; K deltas, row r on delta r % K); built with
//                                      -DDELTACOMP_SHRINK_TRACE it also prints where a multi-tenant stage 1's CTAs
//                                      spend their time
//
// Banks are built here exactly as bank layout 2 describes (rows padded to 4 words, codes packed as in
// deltacomp/quant/packing.py). Before every launch the output and the workspace are filled with NaN, so an output
// the kernels do not write, or a workspace value they read without writing, fails the check. In the multi-tenant
// cases the scales and offsets of deltas that no token row uses are NaN, so reading them into the result fails too.

#include "delta_linear.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#define CHECK_CUDA(call)                                                                        \
  do {                                                                                          \
    const cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

namespace {

using deltacomp::delta_linear_base_launch;
using deltacomp::delta_linear_base_ready_ints;
using deltacomp::delta_linear_launch;
using deltacomp::delta_linear_workspace_floats;

uint16_t half_bits(float v) {
  const __half h = __float2half_rn(v);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
float half_value(uint16_t b) {
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}

// Packs one row of codes as deltacomp/quant/packing.py does (blocks of 32 codes in `bits` words).
void pack_row(const std::vector<int>& codes, int bits, std::vector<int32_t>& out) {
  const int nblk = (static_cast<int>(codes.size()) + 31) / 32;
  for (int b = 0; b < nblk; ++b) {
    uint32_t w[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int q = 0; q < 32; ++q) {
      const int k = b * 32 + q;
      const uint32_t c = k < static_cast<int>(codes.size()) ? static_cast<uint32_t>(codes[k]) : 0u;
      const int pos = bits * q, wi = pos / 32, sh = pos % 32;
      w[wi] |= c << sh;
      if (sh + bits > 32) w[wi + 1] |= c >> (32 - sh);
    }
    for (int i = 0; i < bits; ++i) out.push_back(static_cast<int32_t>(w[i]));
  }
}

struct Group {  // rank rows of one (projection, delta) with the same widths
  int vbits, ubits, rank;
};

struct Bank {
  int n = 0, K = 0, M = 0;
  std::vector<int> out_len;
  std::vector<int32_t> v_words, u_words, rows, projs, spans;
  std::vector<uint16_t> v_scale, v_offset, u_scale, u_offset;
  std::vector<float> s;
  std::vector<std::vector<double>> V, U;  // dequantized rows, for the reference
  std::vector<int> delta;                 // per rank row
  size_t packed_bytes = 0;
};

// Appends one quantized row (codes, per-group fp16 scale/offset) to a factor; returns (word offset, param offset).
void add_row(std::mt19937& rng, int len, int bits, int gs, std::vector<int32_t>& words, std::vector<uint16_t>& sc,
             std::vector<uint16_t>& of, std::vector<double>& dense, int& woff, int& poff) {
  std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  std::vector<int> codes(len);
  for (int& c : codes) c = code(rng);
  while (words.size() % 4) words.push_back(0);
  woff = static_cast<int>(words.size());
  pack_row(codes, bits, words);
  poff = static_cast<int>(sc.size());
  const int groups = gs <= 0 ? 1 : (len + gs - 1) / gs;
  for (int g = 0; g < groups; ++g) {
    const float range = 0.05f + 0.1f * u01(rng);
    const float scale = range / static_cast<float>((1 << bits) - 1);
    sc.push_back(half_bits(scale));
    of.push_back(half_bits(-0.5f * range + 0.02f * (u01(rng) - 0.5f)));
  }
  dense.resize(len);
  for (int k = 0; k < len; ++k) {
    const int g = gs <= 0 ? 0 : k / gs;
    dense[k] = static_cast<double>(codes[k]) * half_value(sc[poff + g]) + half_value(of[poff + g]);
  }
}

// table[p][d]: the width groups of delta d on projection p (empty: the delta leaves p unchanged).
Bank build_bank(int n, const std::vector<int>& out_len, int K, const std::vector<std::vector<std::vector<Group>>>& table,
                const std::vector<int>& gs_of_delta, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  Bank b;
  b.n = n, b.K = K, b.out_len = out_len;
  int out_off = 0;
  for (size_t p = 0; p < out_len.size(); ++p) {
    const int j_start = static_cast<int>(b.s.size());
    for (int d = 0; d < K; ++d) {
      b.spans.push_back(static_cast<int>(b.s.size()));
      for (const Group& g : table[p][d]) {
        for (int i = 0; i < g.rank; ++i) {
          int vw, vp, uw, up;
          std::vector<double> vd, ud;
          add_row(rng, n, g.vbits, gs_of_delta[d], b.v_words, b.v_scale, b.v_offset, vd, vw, vp);
          add_row(rng, out_len[p], g.ubits, gs_of_delta[d], b.u_words, b.u_scale, b.u_offset, ud, uw, up);
          b.rows.insert(b.rows.end(), {g.vbits, vw, vp, g.ubits, uw, up, d, gs_of_delta[d]});
          b.s.push_back(0.5f + 2.f * u01(rng));
          b.V.push_back(std::move(vd));
          b.U.push_back(std::move(ud));
          b.delta.push_back(d);
        }
      }
    }
    b.spans.push_back(static_cast<int>(b.s.size()));
    b.projs.insert(b.projs.end(), {j_start, static_cast<int>(b.s.size()), out_off, out_len[p]});
    out_off += out_len[p];
  }
  b.M = out_off;
  while (b.v_words.size() % 4) b.v_words.push_back(0);  // tensor length a multiple of 4
  while (b.u_words.size() % 4) b.u_words.push_back(0);
  b.packed_bytes = 4 * (b.v_words.size() + b.u_words.size()) + 2 * (b.v_scale.size() + b.v_offset.size() +
                                                                    b.u_scale.size() + b.u_offset.size());
  return b;
}

// The launches `fn` enqueues on `stream`, captured into an instantiated graph (the op must be capturable: no
// synchronisation, no host reads). The caller destroys it.
template <typename F>
cudaGraphExec_t capture(cudaStream_t stream, F&& fn) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  fn();
  CHECK_CUDA(cudaStreamEndCapture(stream, &g));
  CHECK_CUDA(cudaGraphInstantiate(&ge, g, 0));
  CHECK_CUDA(cudaGraphDestroy(g));
  return ge;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  // Exact sizes (at least one element), so that compute-sanitizer sees reads past the bank's end.
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

struct DeviceBank {
  int32_t *v_words, *u_words, *rows, *projs, *spans;
  uint16_t *v_scale, *v_offset, *u_scale, *u_offset;
  float* s;
  explicit DeviceBank(const Bank& b)
      : v_words(to_device(b.v_words)), u_words(to_device(b.u_words)), rows(to_device(b.rows)),
        projs(to_device(b.projs)), spans(to_device(b.spans)), v_scale(to_device(b.v_scale)),
        v_offset(to_device(b.v_offset)), u_scale(to_device(b.u_scale)), u_offset(to_device(b.u_offset)),
        s(to_device(b.s)) {}
  ~DeviceBank() {
    for (void* p : {static_cast<void*>(v_words), static_cast<void*>(u_words), static_cast<void*>(rows),
                    static_cast<void*>(projs), static_cast<void*>(spans), static_cast<void*>(v_scale),
                    static_cast<void*>(v_offset), static_cast<void*>(u_scale), static_cast<void*>(u_offset),
                    static_cast<void*>(s)})
      cudaFree(p);
  }
};

// U by block column (ColumnU in delta_linear.h: a set of columns per segment, delta d's rows of projection p), on
// the device.
struct DeviceColumns {
  deltacomp::ColumnU cu;
  explicit DeviceColumns(const Bank& b) {
    const int P = static_cast<int>(b.out_len.size()), J = static_cast<int>(b.s.size());
    std::vector<int32_t> cols, desc(J, 0), info;
    std::vector<uint32_t> pair(J, 0u);
    int most = 0;
    for (int p = 0; p < P; ++p)
      for (int d = 0; d < b.K; ++d) {
        const int j0 = b.spans[p * (b.K + 1) + d], j1 = b.spans[p * (b.K + 1) + d + 1];
        const int nblk = (b.out_len[p] + 31) / 32;
        int off = 0, one = 1;
        for (int j = j0; j < j1; ++j) {
          const int bits = b.rows[8 * j + 3], gs = b.rows[8 * j + 7];
          desc[j] = bits | off << 4;
          off += bits;
          one = one && (gs <= 0 || gs >= b.out_len[p]);
          pair[j] = b.u_scale[b.rows[8 * j + 5]] | static_cast<uint32_t>(b.u_offset[b.rows[8 * j + 5]]) << 16;
        }
        const int colwords = (off + 3) / 4 * 4, base = static_cast<int>(cols.size());
        cols.resize(base + static_cast<size_t>(nblk) * colwords, 0);
        for (int bk = 0; bk < nblk; ++bk)
          for (int j = j0; j < j1; ++j) {
            const int bits = b.rows[8 * j + 3];
            for (int w = 0; w < bits; ++w)
              cols[base + bk * colwords + (desc[j] >> 4) + w] = b.u_words[b.rows[8 * j + 4] + bk * bits + w];
          }
        info.insert(info.end(), {base, colwords, one});
        most = std::max(most, colwords);
      }
    cols.push_back(0);
    cu.cols = to_device(cols), cu.desc = to_device(desc), cu.pair = to_device(pair), cu.info = to_device(info);
    cu.longest = most;
  }
  ~DeviceColumns() {
    cudaFree(const_cast<int32_t*>(cu.cols)), cudaFree(const_cast<int32_t*>(cu.desc));
    cudaFree(const_cast<uint32_t*>(cu.pair)), cudaFree(const_cast<int32_t*>(cu.info));
  }
};

// Activation storage: 0 float32, 1 float16, 2 bfloat16. Values are rounded to the dtype on the host so the reference
// sees exactly what the kernel reads.
std::vector<uint8_t> encode(const std::vector<float>& v, int dtype, std::vector<double>& rounded) {
  const size_t es = dtype == 0 ? 4 : 2;
  std::vector<uint8_t> out(v.size() * es);
  rounded.resize(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == 0) {
      std::memcpy(&out[4 * i], &v[i], 4);
      rounded[i] = v[i];
    } else if (dtype == 1) {
      const __half h = __float2half_rn(v[i]);
      std::memcpy(&out[2 * i], &h, 2);
      rounded[i] = __half2float(h);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(v[i]);
      std::memcpy(&out[2 * i], &h, 2);
      rounded[i] = __bfloat162float(h);
    }
  }
  return out;
}
double decode(const uint8_t* p, int dtype) {
  if (dtype == 0) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  if (dtype == 1) {
    __half h;
    std::memcpy(&h, p, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, p, 2);
  return __bfloat162float(h);
}

int g_sms = 0;
bool g_columns = true;  // fused calls pass U by block column (DeviceColumns)
bool g_pdl = false;  // programmatic dependent launch: on from compute capability 9.0 (--no-pdl turns it off)
int g_failures = 0;
float g_x_outlier = 0.f;  // when > 0, every 41st input of x is that many times larger (activation outliers)

// The fused op's stage 1 counters: one buffer, zeroed once and grown as needed (each call must leave it zero).
int* g_ready = nullptr;
size_t g_ready_n = 0;
int* ready_buffer(size_t n) {
  if (n > g_ready_n) {
    if (g_ready != nullptr) CHECK_CUDA(cudaFree(g_ready));
    CHECK_CUDA(cudaMalloc(&g_ready, n * sizeof(int)));
    CHECK_CUDA(cudaMemset(g_ready, 0, n * sizeof(int)));
    g_ready_n = n;
  }
  return g_ready;
}

// True when every counter of the buffer is zero again.
bool ready_clear() {
  std::vector<int> v(g_ready_n);
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(v.data(), g_ready, v.size() * sizeof(int), cudaMemcpyDeviceToHost));
  return std::all_of(v.begin(), v.end(), [](int c) { return c == 0; });
}

struct RunResult {
  double rel_err = 0;      // ||out - ref|| / ||ref - y||, the error on the delta's contribution (fused: / ||ref||)
  bool finite = true;
  bool ready_clear = true;  // fused: the call left its counters zero
  float ms = 0;
};

// Runs the op once (or `iters` times for timing) and compares with the float64 reference. fused: the op with the
// base product (delta_linear_base_launch): random base weights W (M, n), y is a bias (M,), and the reference adds
// x W^T; the error is then relative to the whole output.
RunResult run_case(const Bank& b, int R, int dtype, const std::vector<float>& w, uint32_t seed, float y_scale,
                   int iters = 0, bool graph = false, int row_tile = 0, bool fused = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const size_t out_n = static_cast<size_t>(R) * b.M;
  std::vector<float> xf(static_cast<size_t>(R) * b.n), yf(fused ? b.M : out_n);
  std::vector<float> wf(fused ? static_cast<size_t>(b.M) * b.n : 0);
  for (float& v : xf) v = nd(rng);
  if (g_x_outlier > 0.f)
    for (size_t k = 0; k < xf.size(); k += 41) xf[k] *= g_x_outlier;
  for (float& v : yf) v = y_scale * nd(rng);
  for (float& v : wf) v = nd(rng) / std::sqrt(static_cast<float>(b.n));
  std::vector<double> xr, yr, wr;
  const std::vector<uint8_t> xb = encode(xf, dtype, xr), yb = encode(yf, dtype, yr), wb = encode(wf, dtype, wr);
  const size_t es = dtype == 0 ? 4 : 2;

  DeviceBank db(b);
  uint8_t* dx = to_device(xb);
  uint8_t* dy = to_device(yb);
  uint8_t* dbase = to_device(wb);
  float* dw = to_device(w);
  uint8_t* dout = nullptr;
  CHECK_CUDA(cudaMalloc(&dout, std::max<size_t>(1, out_n * es)));
  const std::unique_ptr<DeviceColumns> dcol = fused ? std::make_unique<DeviceColumns>(b) : nullptr;
  const int64_t col_len = fused && g_columns ? dcol->cu.longest : 0;
  const int64_t J = static_cast<int64_t>(b.s.size()), P = static_cast<int64_t>(b.out_len.size());
  // (the fused form has no row_tile)
  const size_t ws =
      delta_linear_workspace_floats(R, b.n, b.M, J, P, g_sms, fused ? 0 : row_tile, fused, col_len, b.K);
  float* dws = nullptr;
  CHECK_CUDA(cudaMalloc(&dws, std::max<size_t>(1, ws) * sizeof(float)));
  CHECK_CUDA(cudaMemset(dws, 0xff, std::max<size_t>(1, ws) * sizeof(float)));  // NaN
  CHECK_CUDA(cudaMemset(dout, 0xff, std::max<size_t>(1, out_n * es)));         // NaN in every dtype
  std::vector<const void*> bases;  // projection p's rows of W
  std::vector<int64_t> base_rows;
  for (size_t p = 0; p < b.out_len.size(); ++p) {
    bases.push_back(dbase + static_cast<size_t>(b.projs[4 * p + 2]) * b.n * es);
    base_rows.push_back(b.out_len[p]);
  }

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  int* ready = fused ? ready_buffer(delta_linear_base_ready_ints(R, b.n, b.M, J, P, g_sms, col_len, b.K)) : nullptr;
  auto launch = [&]() {
    const int64_t un = static_cast<int64_t>(b.u_words.size()), up = static_cast<int64_t>(b.u_scale.size());
    const cudaError_t e =
        fused ? delta_linear_base_launch(dtype, dx, bases.data(), base_rows.data(), dy, dout, R, b.n, b.M, dw, b.K,
                                         db.v_words, db.v_scale, db.v_offset, db.u_words, db.u_scale, db.u_offset, un,
                                         up, db.s, db.rows, J, db.projs, db.spans, P, dws, ready, g_sms, g_pdl,
                                         stream, g_columns ? &dcol->cu : nullptr)
              : delta_linear_launch(dtype, dx, dy, dout, R, b.n, b.M, dw, b.K, db.v_words, db.v_scale, db.v_offset,
                                    db.u_words, db.u_scale, db.u_offset, un, up, db.s, db.rows, J, db.projs, db.spans,
                                    P, dws, g_sms, row_tile, g_pdl, stream);
    if (e != cudaSuccess) {
      std::fprintf(stderr, "launch failed: %s\n", cudaGetErrorString(e));
      std::exit(2);
    }
  };
  RunResult res;
  if (graph) {
    const cudaGraphExec_t ge = capture(stream, launch);
    CHECK_CUDA(cudaGraphLaunch(ge, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    cudaGraphExecDestroy(ge);
  } else {
    launch();
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  CHECK_CUDA(cudaGetLastError());
  if (iters > 0) {
    cudaEvent_t e0, e1;
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    for (int i = 0; i < 5; ++i) launch();
    CHECK_CUDA(cudaEventRecord(e0, stream));
    for (int i = 0; i < iters; ++i) launch();
    CHECK_CUDA(cudaEventRecord(e1, stream));
    CHECK_CUDA(cudaEventSynchronize(e1));
    CHECK_CUDA(cudaEventElapsedTime(&res.ms, e0, e1));
    res.ms /= iters;
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
  std::vector<uint8_t> ob(out_n * es);
  if (!ob.empty()) CHECK_CUDA(cudaMemcpy(ob.data(), dout, ob.size(), cudaMemcpyDeviceToHost));
  if (fused) res.ready_clear = ready_clear();

  // float64 reference: t = x V^T, c = t * s * w[:, delta], out = y + c U (per projection); fused: y is the bias
  // plus x W^T.
  std::vector<double> ref(yr);
  if (fused) {
    ref.assign(out_n, 0.0);
    for (int r = 0; r < R; ++r)
      for (int o = 0; o < b.M; ++o) {
        double t = yr[o];
        for (int k = 0; k < b.n; ++k) t += xr[static_cast<size_t>(r) * b.n + k] * wr[static_cast<size_t>(o) * b.n + k];
        ref[static_cast<size_t>(r) * b.M + o] = t;
      }
  }
  const std::vector<double> before(ref);
  for (int pj = 0; pj < static_cast<int>(b.out_len.size()); ++pj) {
    const int j0 = b.projs[4 * pj], j1 = b.projs[4 * pj + 1], off = b.projs[4 * pj + 2], len = b.projs[4 * pj + 3];
    for (int r = 0; r < R; ++r) {
      for (int j = j0; j < j1 && j < J; ++j) {
        const double wt = w[static_cast<size_t>(r) * b.K + b.delta[j]];
        if (wt == 0.0) continue;
        double t = 0;
        for (int k = 0; k < b.n; ++k) t += xr[static_cast<size_t>(r) * b.n + k] * b.V[j][k];
        const double c = t * b.s[j] * wt;
        for (int i = 0; i < len; ++i) ref[static_cast<size_t>(r) * b.M + off + i] += c * b.U[j][i];
      }
    }
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = decode(&ob[i * es], dtype);
    if (!std::isfinite(o)) res.finite = false;
    num += (o - ref[i]) * (o - ref[i]);
    den += fused ? ref[i] * ref[i] : (ref[i] - before[i]) * (ref[i] - before[i]);
  }
  res.rel_err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);

  cudaStreamDestroy(stream);
  cudaFree(dx), cudaFree(dy), cudaFree(dbase), cudaFree(dw), cudaFree(dout), cudaFree(dws);
  return res;
}

const char* dtype_name(int d) { return d == 0 ? "f32" : d == 1 ? "f16" : "bf16"; }

// Error bounds on the delta's contribution, relative: fp32 accumulation, or the output's rounding to fp16 / bf16
// (y is kept small against the contribution in these checks).
double bound(int dtype) { return dtype == 0 ? 2e-5 : dtype == 1 ? 2e-3 : 1.5e-2; }

void report(const char* what, const Bank& b, int R, int dtype, const RunResult& r) {
  const bool ok = r.finite && r.ready_clear && r.rel_err < bound(dtype);
  if (!ok) ++g_failures;
  std::printf("%-4s %-44s n=%-5d M=%-5d J=%-4zu R=%-2d %-4s rel_err=%.2e%s%s\n", ok ? "ok" : "FAIL", what, b.n, b.M,
              b.s.size(), R, dtype_name(dtype), r.rel_err, r.finite ? "" : " (non-finite outputs)",
              r.ready_clear ? "" : " (counters left non-zero)");
}

std::vector<float> dense_weights(int R, int K, uint32_t seed, bool some_zero) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u01(0.25f, 1.25f);
  std::vector<float> w(static_cast<size_t>(R) * K);
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < K; ++d) w[static_cast<size_t>(r) * K + d] = (some_zero && (r + d) % 3 == 0) ? 0.f : u01(rng);
  return w;
}

// Llama-7B-shaped banks: about 1 bit per weight entry (2 rank rows at 8 bits, 32 at 3 bits, the rest at 2 bits).
std::vector<Group> llama_groups(int m, int n) {
  const double entries = static_cast<double>(m) * n;
  const double per_rank2 = 2.0 * (m + n);  // bits per 2-bit rank row
  const double budget = entries - 2 * 8.0 * (m + n) - 32 * 3.0 * (m + n);
  const int r2 = std::max(0, static_cast<int>(budget / per_rank2));
  return {{8, 8, 2}, {3, 3, 32}, {2, 2, r2}};
}

// Every (V bits, U bits) pair, 2 rank rows each.
std::vector<Group> all_width_pairs() {
  std::vector<Group> pairs;
  for (int vb : {1, 2, 3, 4, 8})
    for (int ub : {1, 2, 3, 4, 8}) pairs.push_back({vb, ub, 2});
  return pairs;
}

// The fused op (base product and delta): every width pair on odd shapes (rows of 33 elements take the scalar path),
// gated projections with three deltas, one row at Llama scale, and an empty bank (the base product alone).
void fused_cases() {
  const std::vector<Group> all_pairs = all_width_pairs();
  const Bank b1 = build_bank(1535, {576}, 1, {{all_pairs}}, {128}, 21);
  const Bank b2 = build_bank(33, {192}, 1, {{all_pairs}}, {0}, 22);
  for (const Bank* b : {&b1, &b2})
    for (int R : {1, 3, 16, 33})
      for (int dtype = 0; dtype < 3; ++dtype)
        report("fused base product, all width pairs", *b, R, dtype,
               run_case(*b, R, dtype, dense_weights(R, 1, R, false), 13 * R + dtype, 0.1f, 0, false, 0, true));
  std::vector<std::vector<std::vector<Group>>> table(3, std::vector<std::vector<Group>>(3));
  table[0][0] = {{8, 8, 2}, {2, 2, 40}};
  table[0][2] = {{4, 4, 3}, {2, 1, 20}};
  table[2][1] = {{3, 2, 7}, {1, 1, 30}};
  const Bank b3 = build_bank(1024, {512, 256, 700}, 3, table, {0, 128, 32}, 23);
  for (int R : {1, 5})
    report("fused base product, 3 projections, 3 deltas", b3, R, 2,
           run_case(b3, R, 2, dense_weights(R, 3, R, true), 17 * R, 0.1f, 0, false, 0, true));
  // The op alone in row tiles of one row (the multi-tenant plan: each tile's CTAs take the groups of the deltas its
  // row weighs; the fused form takes no row_tile), rows weighing several deltas; then five deltas in one group of 32
  // rank rows, rows weighing every combination of used and unused neighbours (row 3 none), and 40 rank rows each in
  // a second projection.
  report("3 deltas, row tiles of 1", b3, 5, 1,
         run_case(b3, 5, 1, dense_weights(5, 3, 7, true), 62, 0.01f, 0, false, 1));
  std::vector<std::vector<std::vector<Group>>> tiny(2, std::vector<std::vector<Group>>(5, {{2, 2, 40}}));
  tiny[0] = {{{2, 2, 3}}, {{3, 2, 7}}, {{2, 3, 5}}, {{4, 4, 2}}, {{2, 2, 9}}};
  const Bank b8 = build_bank(300, {200, 64}, 5, tiny, {0, 128, 0, 32, 0}, 28);
  const std::vector<float> w8 = {1, 0, 0, 0, 0, 1, 0, .5f, 0, 0, .3f, .2f, .1f, .4f, .6f,
                                 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0};
  report("5 deltas in one group, row tiles of 1", b8, 6, 2, run_case(b8, 6, 2, w8, 63, 0.01f, 0, false, 1));
  report("fused base product, graph-captured", b3, 1, 1,
         run_case(b3, 1, 1, dense_weights(1, 3, 1, false), 19, 0.1f, 0, true, 0, true));
  // The one-row kernel with two to four slices per CTA and uneven shares: the work split of GPUs of 16, 20 and 40 SMs.
  const int sms = g_sms;
  for (int fake : {16, 20, 40}) {
    g_sms = fake;
    report("fused base product, one row, split for fewer SMs", b3, 1, fake % 3,
           run_case(b3, 1, fake % 3, dense_weights(1, 3, fake, true), 37 + fake, 0.1f, 0, false, 0, true));
  }
  g_sms = sms;
  // One row at Llama q|k|v scale, twice in a row (the first call must leave its counters zero): about 3,000 rank
  // rows shared out among the CTAs of one wave, three slices of 16 outputs each on a GPU of 128 SMs or more.
  std::vector<std::vector<std::vector<Group>>> big(3, std::vector<std::vector<Group>>(1));
  for (auto& proj : big) proj[0] = llama_groups(4096, 4096);
  const Bank b5 = build_bank(4096, {4096, 4096, 4096}, 1, big, {128}, 25);
  for (int rep = 0; rep < 2; ++rep)
    report("fused base product, one row, Llama-sized", b5, 1, 2,
           run_case(b5, 1, 2, dense_weights(1, 1, 1, false), 31 + rep, 0.1f, 0, false, 0, true));
  // The same with one parameter group a row, with and without U by block column.
  const Bank b7 = build_bank(4096, {4096, 4096, 4096}, 1, big, {0}, 27);
  for (int rep = 0; rep < 3; ++rep) {
    g_columns = rep < 2;
    report(g_columns ? "fused base product, one row, Llama-sized, U by block column"
                     : "fused base product, one row, Llama-sized, one group a row",
           b7, 1, rep % 3, run_case(b7, 1, rep % 3, dense_weights(1, 1, 1, false), 43 + rep, 0.1f, 0, false, 0, true));
  }
  g_columns = true;
  // Uneven shares with U by block column: gate|up at Llama size on this GPU (5.2 slices a CTA on 132 SMs), then two
  // projections split for 16 SMs (700 outputs over 22 CTAs, 2 slices each; 300 over 9 CTAs, 2 or 3 slices; each
  // projection's last slice of 12 outputs).
  std::vector<std::vector<std::vector<Group>>> mlp(2, std::vector<std::vector<Group>>(1));
  for (auto& proj : mlp) proj[0] = llama_groups(11008, 4096);
  const Bank b12 = build_bank(4096, {11008, 11008}, 1, mlp, {0}, 32);
  report("fused base product, one row, gate|up Llama-sized, U by block column", b12, 1, 2,
         run_case(b12, 1, 2, dense_weights(1, 1, 1, false), 87, 0.1f, 0, false, 0, true));
  std::vector<std::vector<std::vector<Group>>> two(2, std::vector<std::vector<Group>>(1, {{3, 2, 7}, {1, 1, 30}}));
  const Bank b13 = build_bank(256, {700, 300}, 1, two, {0}, 33);
  g_sms = 16;
  for (int dtype = 0; dtype < 3; ++dtype)
    report("fused base product, one row, U by block column, uneven shares, split for 16 SMs", b13, 1, dtype,
           run_case(b13, 1, dtype, dense_weights(1, 1, 1, false), 89 + dtype, 0.1f, 0, false, 0, true));
  g_sms = sms;
  // Several deltas with U by block column (one parameter group a row): the segments of the deltas in use in turn, two
  // at once (the next segment's columns land while one is decoded); rows weighing every delta, two, one and none; then
  // split for fewer SMs (several slices a CTA). Then two deltas of 800 rows at 8 bits (6,400 words a column: two
  // segments' do not fit in 48 KB, so the one-row kernel runs without columns).
  const Bank b9 = build_bank(1024, {512, 256, 700}, 3, table, {0, 0, 0}, 29);
  const std::vector<std::vector<float>> w9 = {{.7f, 1.1f, .4f}, {0, 1.1f, .4f}, {0, 0, .9f}, {.5f, 0, 0}, {0, 0, 0}};
  for (int i = 0; i < static_cast<int>(w9.size()); ++i)
    report("fused base product, one row, 3 deltas, U by block column", b9, 1, i % 3,
           run_case(b9, 1, i % 3, w9[i], 71 + i, 0.1f, 0, false, 0, true));
  for (int fake : {16, 40}) {
    g_sms = fake;
    report("fused base product, one row, 3 deltas, U by block column, split for fewer SMs", b9, 1, 2,
           run_case(b9, 1, 2, w9[fake % 3], 77 + fake, 0.1f, 0, false, 0, true));
  }
  g_sms = sms;
  std::vector<std::vector<std::vector<Group>>> wide(1, std::vector<std::vector<Group>>(2, {{2, 8, 800}}));
  const Bank b10 = build_bank(256, {4096}, 2, wide, {0, 0}, 30);
  report("fused base product, one row, 2 deltas, columns too long for two buffers", b10, 1, 2,
         run_case(b10, 1, 2, {.6f, .9f}, 81, 0.1f, 0, false, 0, true));
  // Four deltas at Llama q|k|v scale (about 1,000 rank rows each a projection), twice in a row.
  std::vector<std::vector<std::vector<Group>>> big4(3, std::vector<std::vector<Group>>(4, llama_groups(4096, 4096)));
  const Bank b11 = build_bank(4096, {4096, 4096, 4096}, 4, big4, {0, 0, 0, 0}, 31);
  for (int rep = 0; rep < 2; ++rep)
    report("fused base product, one row, Llama-sized, 4 deltas, U by block column", b11, 1, 2,
           run_case(b11, 1, 2, {.3f, .2f, .4f, .1f}, 83 + rep, 0.1f, 0, false, 0, true));
  // Grids of several waves (planned for 4x the SMs: each slice its own CTA), whose CTAs that start late find stage
  // 1's rank rows claimed by CTAs already waiting; twice in a row (the counters are left zero). Then more CTAs than
  // rank rows.
  g_sms = 4 * sms;
  for (int rep = 0; rep < 2; ++rep) {
    report("fused base product, one row, Llama-sized, several waves", b7, 1, 2,
           run_case(b7, 1, 2, dense_weights(1, 1, 1, false), 53 + rep, 0.1f, 0, false, 0, true));
    report("fused base product, one row, 3 deltas, several waves", b3, 1, rep,
           run_case(b3, 1, rep, dense_weights(1, 3, 1, true), 55 + rep, 0.1f, 0, false, 0, true));
  }
  g_sms = sms;
  std::vector<std::vector<std::vector<Group>>> few(1, std::vector<std::vector<Group>>(1));
  few[0][0] = {{2, 3, 3}};
  const Bank b6 = build_bank(256, {1024}, 1, few, {0}, 26);
  report("fused base product, one row, fewer rank rows than CTAs", b6, 1, 2,
         run_case(b6, 1, 2, dense_weights(1, 1, 1, false), 57, 0.1f, 0, false, 0, true));
  std::vector<std::vector<std::vector<Group>>> none(2, std::vector<std::vector<Group>>(1));
  const Bank b4 = build_bank(256, {300, 64}, 1, none, {0}, 24);
  report("fused base product, empty bank", b4, 2, 2,
         run_case(b4, 2, 2, dense_weights(2, 1, 2, false), 29, 0.1f, 0, false, 0, true));
}

void correctness() {
  const std::vector<Group> all_pairs = all_width_pairs();

  // 1. One delta, one projection, every width pair; ragged lengths, every group size, many row counts and dtypes.
  struct Shape { int n, m; };
  const Shape shapes[] = {{576, 1535}, {1535, 576}, {33, 192}, {4096, 4096}, {200, 1}, {1, 200}};
  const int gss[] = {0, 128, 32, 96};
  const int Rs[] = {1, 2, 3, 4, 5, 8, 16, 17, 33, 64};
  int si = 0;
  for (const Shape& sh : shapes) {
    for (int gs : gss) {
      const Bank b = build_bank(sh.n, {sh.m}, 1, {{all_pairs}}, {gs}, 100 + si);
      for (int R : Rs) {
        const int dtype = (si + R) % 3;
        const RunResult r = run_case(b, R, dtype, dense_weights(R, 1, R, false), 7 * R + si, 0.01f);
        char what[96];
        std::snprintf(what, sizeof what, "all width pairs, gs=%d", gs);
        report(what, b, R, dtype, r);
      }
      ++si;
    }
  }

  // 2. Fused projections sharing x, three deltas with different group sizes, some weights zero, one empty projection
  //    and a delta missing from some projections.
  {
    std::vector<std::vector<std::vector<Group>>> table(4, std::vector<std::vector<Group>>(3));
    table[0][0] = {{8, 8, 2}, {3, 3, 5}, {2, 2, 40}};
    table[0][2] = {{4, 4, 3}, {2, 1, 20}};
    table[1][1] = {{1, 1, 33}};
    table[3][0] = {{3, 2, 7}, {2, 2, 30}};
    table[3][1] = {{8, 4, 1}, {4, 8, 2}, {1, 2, 9}};
    table[3][2] = {{2, 3, 17}};
    const Bank b = build_bank(1535, {576, 192, 192, 1100}, 3, table, {0, 128, 32}, 7);
    for (int R : {1, 5, 16, 40, 64})
      for (int dtype = 0; dtype < 3; ++dtype)
        report("fused projections, 3 deltas, zero weights", b, R, dtype,
               run_case(b, R, dtype, dense_weights(R, 3, R + dtype, true), 11 * R + dtype, 0.01f));
  }

  // 3. Multi-tenant: 16 deltas in one bank, one-hot weights; the deltas no row uses have NaN scales and offsets.
  {
    std::vector<std::vector<std::vector<Group>>> table(2, std::vector<std::vector<Group>>(16));
    for (int d = 0; d < 16; ++d) {
      table[0][d] = {{8, 8, 1}, {3, 3, 4}, {2, 2, 27}};
      table[1][d] = {{4, 2, 3}, {2, 2, 13}};
    }
    std::vector<int> gsd(16);
    for (int d = 0; d < 16; ++d) gsd[d] = d % 2 ? 128 : 0;
    Bank b = build_bank(576, {576, 1000}, 16, table, gsd, 99);
    for (int R : {1, 3, 16, 33}) {
      std::mt19937 rng(R);
      std::vector<float> w(static_cast<size_t>(R) * 16, 0.f);
      std::vector<bool> used(16, false);
      for (int r = 0; r < R; ++r) {
        const int d = static_cast<int>(rng() % 5) * 3;  // deltas 0, 3, 6, 9, 12 only
        w[static_cast<size_t>(r) * 16 + d] = 1.f;
        used[d] = true;
      }
      Bank bp = b;
      for (size_t j = 0; j < bp.s.size(); ++j) {
        if (used[bp.delta[j]]) continue;
        const int* row = &bp.rows[8 * j];
        const int vg = row[7] <= 0 ? 1 : (bp.n + row[7] - 1) / row[7];
        for (int g = 0; g < vg; ++g) bp.v_scale[row[2] + g] = bp.v_offset[row[2] + g] = 0x7e00;
        int plen = 0;
        for (size_t p = 0; p < bp.out_len.size(); ++p)
          if (static_cast<int>(j) >= bp.projs[4 * p] && static_cast<int>(j) < bp.projs[4 * p + 1]) plen = bp.out_len[p];
        const int ug = row[7] <= 0 ? 1 : (plen + row[7] - 1) / row[7];
        for (int g = 0; g < ug; ++g) bp.u_scale[row[5] + g] = bp.u_offset[row[5] + g] = 0x7e00;
      }
      for (int dtype : {2, 0}) report("16 deltas, one-hot, unused deltas NaN", bp, R, dtype,
                                      run_case(bp, R, dtype, w, 5 * R + dtype, 0.01f));
      report("16 deltas, one-hot, row tiles of 1", bp, R, 2, run_case(bp, R, 2, w, 3 * R, 0.01f, 0, true, 1));
      report("16 deltas, one-hot, row tiles of 4", bp, R, 1, run_case(bp, R, 1, w, 3 * R + 1, 0.01f, 0, false, 4));
    }
  }

  // 4. Activation outliers (every 41st input 300 times the others) at one-row tiles, one delta and four, and in the
  //    fused form: the bound holds for inputs of a wide range (as a form that rounds x per block of inputs must).
  {
    g_x_outlier = 300.f;
    const Bank b = build_bank(4096, {576, 1535}, 1, {{all_pairs}, {all_pairs}}, {128}, 41);
    std::vector<std::vector<std::vector<Group>>> table(1, std::vector<std::vector<Group>>(4));
    for (int d = 0; d < 4; ++d) table[0][d] = {{1, 1, 40}, {2, 3, 9}, {8, 4, 2}};
    const Bank b4 = build_bank(1535, {1100}, 4, table, {0, 128, 32, 96}, 43);
    for (int dtype : {1, 2})
      for (int R : {1, 3}) {
        report("activation outliers, row tiles of 1", b, R, dtype,
               run_case(b, R, dtype, dense_weights(R, 1, R, false), 13 * R + dtype, 0.01f, 0, false, 1));
        report("activation outliers, 4 deltas, row tiles of 1", b4, R, dtype,
               run_case(b4, R, dtype, dense_weights(R, 4, R + dtype, false), 17 * R + dtype, 0.01f, 0, false, 1));
        report("activation outliers, fused", b, R, dtype,
               run_case(b, R, dtype, dense_weights(R, 1, R, false), 19 * R + dtype, 0.1f, 0, false, 0, true));
      }
    g_x_outlier = 0.f;
  }

  // 5. Empty bank (J = 0): out = y. Compared against y itself.
  {
    std::vector<std::vector<std::vector<Group>>> table(2, std::vector<std::vector<Group>>(1));
    const Bank b = build_bank(100, {64, 37}, 1, table, {0}, 3);
    for (int dtype = 0; dtype < 3; ++dtype) {
      const RunResult r = run_case(b, 3, dtype, dense_weights(3, 1, 1, false), 1, 1.f);
      const bool ok = r.finite && r.rel_err == 0.0;
      if (!ok) ++g_failures;
      std::printf("%-4s empty bank: out == y (%s) err=%.2e\n", ok ? "ok" : "FAIL", dtype_name(dtype), r.rel_err);
    }
  }

  // 6. The fused op.
  fused_cases();

  // 7. CUDA graph capture and replay, Llama-sized shapes at 1 and 16 rows.
  {
    std::vector<std::vector<std::vector<Group>>> table(1, std::vector<std::vector<Group>>(1));
    table[0][0] = {{8, 8, 2}, {3, 3, 32}, {2, 2, 222}};
    const Bank b = build_bank(11008, {4096}, 1, table, {128}, 5);
    for (int R : {1, 16}) report("graph-captured, down_proj shape", b, R, 2,
                                 run_case(b, R, 2, dense_weights(R, 1, R, false), R, 0.01f, 0, true));
  }
}


void bench() {
  struct Case { const char* name; int n; std::vector<int> outs; int deltas; };
  const Case cases[] = {
      {"q|k|v 3x4096x4096", 4096, {4096, 4096, 4096}, 1},
      {"o 4096x4096", 4096, {4096}, 1},
      {"gate|up 2x11008x4096", 4096, {11008, 11008}, 1},
      {"down 4096x11008", 11008, {4096}, 1},
      {"q|k|v, 16 deltas", 4096, {4096, 4096, 4096}, 16},
  };
  for (const Case& c : cases) {
    std::vector<std::vector<std::vector<Group>>> table(c.outs.size(), std::vector<std::vector<Group>>(c.deltas));
    for (size_t p = 0; p < c.outs.size(); ++p)
      for (int d = 0; d < c.deltas; ++d) table[p][d] = llama_groups(c.outs[p], c.n);
    const Bank b = build_bank(c.n, c.outs, c.deltas, table, std::vector<int>(c.deltas, 128), 1);
    const double per_delta = static_cast<double>(b.packed_bytes) / c.deltas;
    for (int R : {1, 4, 16, 64}) {
      std::vector<float> w(static_cast<size_t>(R) * c.deltas, 0.f);
      for (int r = 0; r < R; ++r) w[static_cast<size_t>(r) * c.deltas + (c.deltas > 1 ? r % c.deltas : 0)] = 1.f;
      const int used = std::min(R, c.deltas);
      const RunResult r = run_case(b, R, 2, w, R, 0.01f, 50);
      const double bytes = per_delta * used;
      const bool ok = r.finite && r.rel_err < bound(2);
      if (!ok) ++g_failures;
      std::printf("%-4s %-24s R=%-2d deltas used=%-2d %7.1f us  packed %6.2f MB read  %6.0f GB/s  rel_err=%.1e\n",
                  ok ? "ok" : "FAIL", c.name, R, used, 1e3 * r.ms, bytes / 1e6, bytes / (r.ms * 1e-3) / 1e9,
                  r.rel_err);
    }
  }
}

// One of the four fused calls of a Llama-2-7B layer at one row (bf16 activations and weights): kFusedCopies copies of
// its bank, columns, base weights, input and output (rotated so that L2 does not hold them), K deltas a bank weighted
// 1 / K (or one of them alone), and the launch of a copy in one of four modes.
constexpr int kFusedCopies = 8;

struct FusedCall {
  const char* name;
  int n, K;
  std::vector<int64_t> rows;
  Bank b, e;  // the bank and an empty one
  std::vector<std::unique_ptr<DeviceBank>> banks;
  std::vector<std::unique_ptr<DeviceColumns>> colsets;
  std::unique_ptr<DeviceBank> empty;
  std::vector<std::vector<void*>> bases;
  std::vector<void*> xs, outs;
  float* dw = nullptr;
  size_t ws_floats = 0, ready_ints = 0;  // what a call needs of the workspace and the counters

  FusedCall(const char* name_, int n_, const std::vector<int>& out_len, int K_, bool one_hot)
      : name(name_), n(n_), K(K_), rows(out_len.begin(), out_len.end()) {
    const int P = static_cast<int>(out_len.size());
    std::vector<std::vector<std::vector<Group>>> table(P, std::vector<std::vector<Group>>(K));
    for (int p = 0; p < P; ++p)
      for (int d = 0; d < K; ++d) table[p][d] = llama_groups(out_len[p], n);
    b = build_bank(n, out_len, K, table, std::vector<int>(K, 0), 1);
    std::vector<std::vector<std::vector<Group>>> none(P, std::vector<std::vector<Group>>(1));
    e = build_bank(n, out_len, 1, none, {128}, 2);
    empty = std::make_unique<DeviceBank>(e);
    bases.resize(kFusedCopies);
    for (int i = 0; i < kFusedCopies; ++i) {
      banks.push_back(std::make_unique<DeviceBank>(b));
      colsets.push_back(std::make_unique<DeviceColumns>(b));
      for (int q = 0; q < P; ++q) {
        void* wp = nullptr;
        CHECK_CUDA(cudaMalloc(&wp, 2ull * out_len[q] * n));
        CHECK_CUDA(cudaMemset(wp, 0x3c, 2ull * out_len[q] * n));
        bases[i].push_back(wp);
      }
      void *x = nullptr, *o = nullptr;
      CHECK_CUDA(cudaMalloc(&x, 2ull * n));
      CHECK_CUDA(cudaMemset(x, 0x3c, 2ull * n));
      CHECK_CUDA(cudaMalloc(&o, 2ull * b.M));
      xs.push_back(x), outs.push_back(o);
    }
    std::vector<float> wv(K, one_hot ? 0.f : 1.f / K);
    if (one_hot) wv[K / 2] = 1.f;
    dw = to_device(wv);
    const int64_t J = static_cast<int64_t>(b.s.size()), cl = colsets[0]->cu.longest;
    ws_floats = std::max({delta_linear_workspace_floats(1, n, b.M, J, P, g_sms, 0, true),
                          delta_linear_workspace_floats(1, n, b.M, J, P, g_sms, 0, true, cl, K),
                          delta_linear_workspace_floats(1, n, b.M, J, P, g_sms, 0, false)});
    ready_ints = std::max(delta_linear_base_ready_ints(1, n, b.M, J, P, g_sms),
                          delta_linear_base_ready_ints(1, n, b.M, J, P, g_sms, cl, K));
  }
  FusedCall(const FusedCall&) = delete;
  FusedCall& operator=(const FusedCall&) = delete;
  ~FusedCall() {
    for (int i = 0; i < kFusedCopies; ++i) {
      for (void* q : bases[i]) cudaFree(q);
      cudaFree(xs[i]), cudaFree(outs[i]);
    }
    cudaFree(dw);
  }

  // Copy i in mode 0 fused, 1 fused with an empty bank, 2 the delta op alone, 3 fused with U by block column.
  void launch(int i, int mode, float* ws, int* ready, cudaStream_t st) const {
    const DeviceBank& d = mode == 1 ? *empty : *banks[i];
    const Bank& h = mode == 1 ? e : b;
    const int P = static_cast<int>(rows.size());
    const int64_t j = static_cast<int64_t>(h.s.size());
    const int64_t un = static_cast<int64_t>(h.u_words.size()), up = static_cast<int64_t>(h.u_scale.size());
    const cudaError_t err =
        mode != 2 ? delta_linear_base_launch(2, xs[i], bases[i].data(), rows.data(), nullptr, outs[i], 1, n, b.M, dw,
                                             mode == 1 ? 1 : K, d.v_words, d.v_scale, d.v_offset, d.u_words,
                                             d.u_scale, d.u_offset, un, up, d.s, d.rows, j, d.projs, d.spans, P, ws,
                                             ready, g_sms, g_pdl, st, mode == 3 ? &colsets[i]->cu : nullptr)
                  : delta_linear_launch(2, xs[i], outs[i], outs[i], 1, n, b.M, dw, K, d.v_words, d.v_scale,
                                        d.v_offset, d.u_words, d.u_scale, d.u_offset, un, up, d.s, d.rows, j,
                                        d.projs, d.spans, P, ws, g_sms, 0, g_pdl, st);
    CHECK_CUDA(err);
  }
};

// The four calls of a layer, in order.
std::vector<std::unique_ptr<FusedCall>> fused_calls(int K, bool one_hot) {
  std::vector<std::unique_ptr<FusedCall>> calls;
  calls.push_back(std::make_unique<FusedCall>("q|k|v", 4096, std::vector<int>{4096, 4096, 4096}, K, one_hot));
  calls.push_back(std::make_unique<FusedCall>("o", 4096, std::vector<int>{4096}, K, one_hot));
  calls.push_back(std::make_unique<FusedCall>("gate|up", 4096, std::vector<int>{11008, 11008}, K, one_hot));
  calls.push_back(std::make_unique<FusedCall>("down", 11008, std::vector<int>{4096}, K, one_hot));
  return calls;
}

// Median microseconds of the launches `fn` enqueues (captured in a graph, 5 warm-up replays, 25 timed).
template <typename F>
float graph_us(cudaStream_t st, F&& fn) {
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  const cudaGraphExec_t ge = capture(st, fn);
  for (int k = 0; k < 5; ++k) CHECK_CUDA(cudaGraphLaunch(ge, st));
  std::vector<float> t;
  for (int r = 0; r < 25; ++r) {
    CHECK_CUDA(cudaEventRecord(e0, st));
    CHECK_CUDA(cudaGraphLaunch(ge, st));
    CHECK_CUDA(cudaEventRecord(e1, st));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(1e3f * ms);
  }
  std::sort(t.begin(), t.end());
  CHECK_CUDA(cudaGraphExecDestroy(ge));
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  return t[t.size() / 2];
}

// The fused form at 1 row on the Llama-7B-shaped banks (bfloat16), per call: the fused op (U by row and by block
// column), the fused op with an empty bank (its base product alone) and the delta op alone, the copies called in turn
// in one CUDA graph of 32 calls (the L2 cache holds none of them between uses). With K > 1 the banks hold K such
// deltas, each weighted 1 / K (a token gate's mixture), or with `one_hot` delta K / 2 alone.
void fused_bench(int K, bool one_hot) {
  constexpr int kCalls = 32;
  cudaStream_t st;
  CHECK_CUDA(cudaStreamCreate(&st));
  for (const auto& c : fused_calls(K, one_hot)) {
    float* ws = nullptr;
    CHECK_CUDA(cudaMalloc(&ws, c->ws_floats * sizeof(float)));
    int* ready = ready_buffer(c->ready_ints);
    float us[4];
    for (int mode = 0; mode < 4; ++mode)
      us[mode] = graph_us(st, [&] {
                   for (int k = 0; k < kCalls; ++k) c->launch(k % kFusedCopies, mode, ws, ready, st);
                 }) /
                 kCalls;
    std::printf("fused, 1 row, bf16, %d delta(s)%s, %-8s fused %6.1f us | with U columns %6.1f us | "
                "empty bank %6.1f us | delta op alone %6.1f us | fused - empty %5.1f us, with U columns %5.1f us\n",
                K, one_hot ? " one-hot" : "", c->name, us[0], us[3], us[1], us[2], us[0] - us[1], us[3] - us[1]);
    cudaFree(ws);
  }
  CHECK_CUDA(cudaStreamDestroy(st));
}

// A layer's four fused calls of K deltas on a stream of their own, with a workspace and counters that fit each.
struct LayerCalls {
  cudaStream_t st = nullptr;
  std::vector<std::unique_ptr<FusedCall>> calls;
  float* ws = nullptr;
  int* ready = nullptr;
  explicit LayerCalls(int K) : calls(fused_calls(K, false)) {
    CHECK_CUDA(cudaStreamCreate(&st));
    size_t wsf = 0, rn = 0;
    for (const auto& c : calls) wsf = std::max(wsf, c->ws_floats), rn = std::max(rn, c->ready_ints);
    CHECK_CUDA(cudaMalloc(&ws, wsf * sizeof(float)));
    ready = ready_buffer(rn);
  }
  ~LayerCalls() {
    cudaFree(ws);
    cudaStreamDestroy(st);
  }
};

// A decode step's layers: the four calls in turn, 32 layers over the copies, per layer (us), beside the sum of each
// call alone (32 of it in turn), in the fused modes: what the calls cost where different calls follow each other.
void layer_bench(int K) {
  constexpr int kLayers = 32;
  const LayerCalls lc(K);
  const auto& calls = lc.calls;
  float* ws = lc.ws;
  int* ready = lc.ready;
  cudaStream_t st = lc.st;
  const char* names[] = {"fused, U by row", "empty bank", "", "with U columns"};
  for (int mode : {1, 3, 0}) {
    const float layer = graph_us(st, [&] {
                          for (int l = 0; l < kLayers; ++l)
                            for (const auto& c : calls) c->launch(l % kFusedCopies, mode, ws, ready, st);
                        }) /
                        kLayers;
    float sum = 0.f;
    std::string each;
    for (const auto& c : calls) {
      const float us = graph_us(st, [&] {
                         for (int l = 0; l < kLayers; ++l) c->launch(l % kFusedCopies, mode, ws, ready, st);
                       }) /
                       kLayers;
      sum += us;
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s%s %.1f", each.empty() ? "" : ", ", c->name, us);
      each += buf;
    }
    std::printf("layer, 1 row, bf16, %d delta(s), %-16s the calls in turn %6.1f us | each alone, summed %6.1f us "
                "(%s)\n", K, names[mode], layer, sum, each.c_str());
  }
}

#if defined(DELTACOMP_ROW_TRACE) || defined(DELTACOMP_SHRINK_TRACE)
// The timing builds' summaries: the median (the upper one of an even count) and the largest of x, 0 when empty.
double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x.empty() ? 0.0 : x[x.size() / 2];
}
double largest(const std::vector<double>& x) { return x.empty() ? 0.0 : *std::max_element(x.begin(), x.end()); }
#endif

#ifdef DELTACOMP_ROW_TRACE
// The one-row kernel's stamps (DELTACOMP_ROW_TRACE builds): the four calls of a layer in turn over 32 layers, and
// each call 32 times alone, one graph replay each after warm-up; per call (the median over the layers after the
// first, us) from the first CTA past its wait (A): the last CTA past its wait, stage 1 done everywhere, a CTA's
// first slice's base product done (median CTA), the base products done (median CTA, last CTA), the count seen by the
// last CTA, the first and last CTA out; and the gap from the previous call's last CTA out to A (the previous one-row
// call's end to this call's start: a call in between on other kernels counts in it), and the first CTA in before A.
// Then the base products done by the CTAs of the most outputs and by the others, the stage-1 rank rows a CTA
// computed (median, and the last CTA's to finish its base products), and the distance b' - b most common between
// CTAs sharing an SM.
void trace_bench(int K) {
  constexpr int kLayers = 32, kCap = 4 * kLayers;
  const LayerCalls lc(K);
  const auto& calls = lc.calls;
  float* ws = lc.ws;
  int* ready = lc.ready;
  cudaStream_t st = lc.st;
  unsigned long long* buf = nullptr;
  int* ctas = nullptr;
  const size_t n = static_cast<size_t>(kCap) * deltacomp::kTraceCtas * deltacomp::kTraceStamps;
  CHECK_CUDA(cudaMalloc(&buf, n * sizeof(unsigned long long)));
  CHECK_CUDA(cudaMalloc(&ctas, kCap * sizeof(int)));
  CHECK_CUDA(cudaMemcpyToSymbol(deltacomp::g_row_trace, &buf, sizeof buf));
  CHECK_CUDA(cudaMemcpyToSymbol(deltacomp::g_row_trace_ctas, &ctas, sizeof ctas));
  // Whether call q in `mode` runs the one-row kernel (the others, e.g. gate|up without columns, leave no stamps).
  const auto one_row = [&](int q, int mode) {
    const int zero = 0;
    int calls_seen = 0;
    CHECK_CUDA(cudaMemcpyToSymbol(deltacomp::g_row_trace_cap, &zero, sizeof zero));
    CHECK_CUDA(cudaMemcpyToSymbol(deltacomp::g_row_trace_call, &zero, sizeof zero));
    calls[q]->launch(0, mode, ws, ready, st);
    CHECK_CUDA(cudaStreamSynchronize(st));
    CHECK_CUDA(cudaMemcpyFromSymbol(&calls_seen, deltacomp::g_row_trace_call, sizeof calls_seen));
    return calls_seen == 1;
  };
  const auto run = [&](std::vector<int> which, int mode, const char* label) {
    const std::vector<int> launched = which;  // every call runs; only the one-row calls are traced
    which.erase(std::remove_if(which.begin(), which.end(), [&](int q) {
                  const bool row = one_row(q, mode);
                  if (!row) std::printf("trace, %d delta(s), %-16s %-8s not the one-row kernel\n", K, label,
                                        calls[q]->name);
                  return !row;
                }),
                which.end());
    if (which.empty()) return;
    const int zero = 0, cap = kCap;
    const cudaGraphExec_t ge = capture(st, [&] {
      for (int l = 0; l < kLayers; ++l)
        for (int q : launched) calls[q]->launch(l % kFusedCopies, mode, ws, ready, st);
    });
    CHECK_CUDA(cudaMemcpyToSymbol(deltacomp::g_row_trace_cap, &zero, sizeof zero));
    for (int k = 0; k < 5; ++k) CHECK_CUDA(cudaGraphLaunch(ge, st));
    CHECK_CUDA(cudaStreamSynchronize(st));
    CHECK_CUDA(cudaMemcpyToSymbol(deltacomp::g_row_trace_call, &zero, sizeof zero));
    CHECK_CUDA(cudaMemcpyToSymbol(deltacomp::g_row_trace_cap, &cap, sizeof cap));
    CHECK_CUDA(cudaMemset(buf, 0, n * sizeof(unsigned long long)));
    CHECK_CUDA(cudaGraphLaunch(ge, st));
    CHECK_CUDA(cudaStreamSynchronize(st));
    CHECK_CUDA(cudaGraphExecDestroy(ge));
    std::vector<unsigned long long> h(n);
    std::vector<int> g(kCap);
    CHECK_CUDA(cudaMemcpy(h.data(), buf, n * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(g.data(), ctas, kCap * sizeof(int), cudaMemcpyDeviceToHost));
    const int per = static_cast<int>(which.size()), total = per * kLayers;
    // per call: fields (us from A)
    constexpr int F = 23;
    std::vector<std::vector<std::vector<double>>> v(per, std::vector<std::vector<double>>(F));
    double prev_out = 0.0;
    for (int c = 0; c < total; ++c) {
      const int grid = std::min(g[c], deltacomp::kTraceCtas);
      std::vector<double> t[deltacomp::kTraceTimes];
      std::vector<const unsigned long long*> cta(grid);
      for (int b = 0; b < grid; ++b) {
        cta[b] = h.data() + (static_cast<size_t>(c) * deltacomp::kTraceCtas + b) * deltacomp::kTraceStamps;
        for (int k = 0; k < deltacomp::kTraceTimes; ++k)
          if (cta[b][k] != 0) t[k].push_back(static_cast<double>(cta[b][k]));
      }
      if (t[1].empty() || t[5].empty()) continue;
      const double A = *std::min_element(t[1].begin(), t[1].end());
      const auto at = [&](int b, int k) { return (static_cast<double>(cta[b][k]) - A) / 1e3; };
      // The CTAs sharing an SM: how often the most common distance b' - b between two of them.
      std::vector<std::vector<int>> on_sm(1024);
      for (int b = 0; b < grid; ++b)
        if (cta[b][deltacomp::kTraceTimes] != 0) on_sm[(cta[b][deltacomp::kTraceTimes] - 1) % 1024].push_back(b);
      std::vector<int> dist(grid, 0);
      for (const auto& m : on_sm)
        for (size_t i = 1; i < m.size(); ++i) ++dist[m[i] - m[i - 1]];
      const int mode_dist = static_cast<int>(std::max_element(dist.begin(), dist.end()) - dist.begin());
      // The base products done by the CTAs of the most outputs and of fewer; the last one's stage-1 rows.
      unsigned long long most = 0;
      for (int b = 0; b < grid; ++b) most = std::max(most, cta[b][deltacomp::kTraceTimes + 1]);
      std::vector<double> heavy, light, rows;
      int last_b = 0;
      for (int b = 0; b < grid; ++b) {
        (cta[b][deltacomp::kTraceTimes + 1] == most ? heavy : light).push_back(at(b, 3));
        rows.push_back(static_cast<double>(cta[b][deltacomp::kTraceTimes + 2]));
        if (cta[b][3] > cta[last_b][3]) last_b = b;
      }
      for (auto& x : t) std::sort(x.begin(), x.end());
      const auto rel = [&](const std::vector<double>& x, bool end) {
        return x.empty() ? 0.0 : ((end ? largest(x) : median(x)) - A) / 1e3;
      };
      const double fields[F] = {prev_out > 0 ? (A - prev_out) / 1e3 : 0.0, (A - t[0].front()) / 1e3,
                                rel(t[1], true), rel(t[2], true), rel(t[3], false), rel(t[3], true),
                                rel(t[4], true), (t[5].front() - A) / 1e3, rel(t[5], true),
                                static_cast<double>(mode_dist), static_cast<double>(dist[mode_dist]),
                                static_cast<double>(most), static_cast<double>(heavy.size()), median(heavy),
                                largest(heavy), median(light), largest(light), median(rows),
                                static_cast<double>(cta[last_b][deltacomp::kTraceTimes + 2]), rel(t[6], false),
                                rel(t[7], false), rel(t[7], true), rel(t[8], false)};
      prev_out = t[5].back();
      if (c >= per)  // after the first layer
        for (int f = 0; f < F; ++f) v[c % per][f].push_back(fields[f]);
    }
    for (int q = 0; q < per; ++q) {
      double med[F];
      for (int f = 0; f < F; ++f) med[f] = median(v[q][f]);
      std::printf("trace, %d delta(s), %-16s %-8s gap %5.2f | first in %5.2f before | last past wait %5.2f | "
                  "stage 1 done %5.2f | first slice's base done %6.2f (median) | base done %6.2f (median) %6.2f "
                  "(last) | count seen %6.2f | out %6.2f (first) %6.2f (last) us\n",
                  K, label, calls[which[q]]->name, med[0], med[1], med[2], med[3], med[22], med[4], med[5], med[6],
                  med[7], med[8]);
      std::printf("       CTAs of %.0f outputs (%.0f): base done %6.2f (median) %6.2f (last) | fewer: %6.2f %6.2f | stage 1 "
                  "rows a CTA %.0f (median), %.0f (the last base done) | CTAs on one SM %.0f apart: %.0f pairs\n",
                  med[11], med[12], med[13], med[14], med[15], med[16], med[17], med[18], med[9], med[10]);
      if (med[19] > 0 || med[20] > 0)  // the column tail's stamps
        std::printf("       columns: last segment read %6.2f (median) | sums done %6.2f (median) %6.2f (last) us\n",
                    med[19], med[20], med[21]);
    }
  };
  for (int mode : {1, 3}) {
    const char* label = mode == 1 ? "empty bank" : "with U columns";
    run({0, 1, 2, 3}, mode, label);
    for (int q = 0; q < 4; ++q) run({q}, mode, mode == 1 ? "empty, alone" : "U columns, alone");
  }
  cudaFree(buf), cudaFree(ctas);
}
#endif

#ifdef DELTACOMP_SHRINK_TRACE
// One launch of a multi-tenant stage 1 (`run`, grid `grid`) in a -DDELTACOMP_SHRINK_TRACE build: where its CTAs' time
// goes (shrink_kernel's phases, see delta_linear.cu). Prints the launch's span (first CTA in to last out), then over
// the CTAs the median and the largest of: groups walked, time in the CTA, and each phase's sum; then the same sums
// per group (medians) and the phases of the CTA that left last.
template <typename F>
void shrink_trace(F&& run, dim3 grid, cudaStream_t st) {
  using namespace deltacomp;
  const size_t ctas = static_cast<size_t>(grid.x) * grid.y * grid.z, n = ctas * kShrinkTraceFields;
  unsigned long long* buf = nullptr;
  CHECK_CUDA(cudaMalloc(&buf, n * sizeof(unsigned long long)));
  CHECK_CUDA(cudaMemset(buf, 0, n * sizeof(unsigned long long)));
  CHECK_CUDA(cudaMemcpyToSymbol(g_shrink_trace, &buf, sizeof buf));
  run();
  CHECK_CUDA(cudaStreamSynchronize(st));
  unsigned long long* none = nullptr;
  CHECK_CUDA(cudaMemcpyToSymbol(g_shrink_trace, &none, sizeof none));
  std::vector<unsigned long long> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), buf, n * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(buf));
  const auto at = [&](size_t c, int k) { return static_cast<double>(h[c * kShrinkTraceFields + k]); };
  double first = at(0, kTraceEntry), last = 0.0;
  size_t last_cta = 0;
  for (size_t c = 0; c < ctas; ++c) {
    first = std::min(first, at(c, kTraceEntry));
    if (at(c, kTraceExit) > last) last = at(c, kTraceExit), last_cta = c;
  }
  constexpr int kPhases = kTraceStore + 1;
  const char* names[kPhases] = {"wait", "find", "meta", "stage", "decode", "store"};
  std::vector<double> groups, span, phase[kPhases], per_group[kPhases];
  for (size_t c = 0; c < ctas; ++c) {
    const double gc = at(c, kTraceGroups);
    groups.push_back(gc);
    span.push_back((at(c, kTraceExit) - at(c, kTraceEntry)) / 1e3);
    for (int k = 0; k < kPhases; ++k) {
      phase[k].push_back(at(c, k) / 1e3);
      if (k != kTraceWait && gc > 0) per_group[k].push_back(at(c, k) / 1e3 / gc);
    }
  }
  std::printf("stage-1 trace: %zu CTAs, span %.1f us; a CTA (median / largest): groups %.0f / %.0f, in the CTA %.1f / "
              "%.1f us;", ctas, (last - first) / 1e3, median(groups), largest(groups), median(span), largest(span));
  for (int k = 0; k < kPhases; ++k) std::printf(" %s %.1f / %.1f", names[k], median(phase[k]), largest(phase[k]));
  std::printf(" us\n  per group (medians):");
  for (int k = kTraceFind; k < kPhases; ++k) std::printf(" %s %.2f", names[k], median(per_group[k]));
  std::printf(" us | the last CTA out: entered %.1f us after the first, %.0f groups,",
              (at(last_cta, kTraceEntry) - first) / 1e3, at(last_cta, kTraceGroups));
  for (int k = 0; k < kPhases; ++k) std::printf(" %s %.1f", names[k], at(last_cta, k) / 1e3);
  std::printf(" us\n");
}
#endif

__global__ void empty_kernel() {}

// Times each kernel of the op separately (same plan as delta_linear_launch), plus an empty launch and a CUDA graph
// replay of the whole op, on the Llama-shaped q|k|v bank, or its first P projections (float16 activations). With
// K > 1 deltas the bank holds K such deltas and row r weighs delta r % K alone, in row tiles of one (a multi-tenant
// batch) unless row_tile says otherwise (>= 0).
void stages(int only_r, int K, int row_tile, int P) {
  using namespace deltacomp;
  std::vector<std::vector<std::vector<Group>>> table(P, std::vector<std::vector<Group>>(K));
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < K; ++d) table[p][d] = llama_groups(4096, 4096);
  const Bank b = build_bank(4096, std::vector<int>(P, 4096), K, table, std::vector<int>(K, 128), 1);
  if (row_tile < 0) row_tile = K > 1 ? 1 : 0;
  DeviceBank db(b);
  const int J = static_cast<int>(b.s.size());
  std::printf("bank: %d projection(s) of 4096 x 4096, %d delta(s)\n", P, K);
  cudaStream_t st;
  CHECK_CUDA(cudaStreamCreate(&st));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  auto time_it = [&](auto&& fn) {
    for (int i = 0; i < 5; ++i) fn();
    CHECK_CUDA(cudaEventRecord(e0, st));
    for (int i = 0; i < 100; ++i) fn();
    CHECK_CUDA(cudaEventRecord(e1, st));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    CHECK_CUDA(cudaGetLastError());
    return 1e3f * ms / 100;
  };
  std::printf("empty kernel launch: %.2f us\n", time_it([&] { empty_kernel<<<1, 32, 0, st>>>(); }));
  for (int R : {1, 4, 16, 64}) {
    if (only_r > 0 && R != only_r) continue;
    std::vector<__half> x(static_cast<size_t>(R) * b.n, __float2half(0.1f)), y(static_cast<size_t>(R) * b.M);
    std::vector<float> w(static_cast<size_t>(R) * K, 0.f);
    for (int r = 0; r < R; ++r) w[static_cast<size_t>(r) * K + r % K] = 1.f;
    __half* dx = to_device(x);
    __half* dy = to_device(y);
    __half* dout = to_device(y);
    float* dw = to_device(w);
    const Plan p = make_plan(R, b.n, b.M, J, P, g_sms, row_tile);
    float* ws = nullptr;
    CHECK_CUDA(cudaMalloc(&ws, p.total * sizeof(float)));
    const auto* vs = reinterpret_cast<const __half*>(db.v_scale);
    const auto* vo = reinterpret_cast<const __half*>(db.v_offset);
    const auto* us = reinterpret_cast<const __half*>(db.u_scale);
    const auto* uo = reinterpret_cast<const __half*>(db.u_offset);
    auto full = [&] {
      delta_linear_launch(1, dx, dy, dout, R, b.n, b.M, dw, K, db.v_words, vs, vo, db.u_words, us, uo,
                          static_cast<int64_t>(b.u_words.size()), static_cast<int64_t>(b.u_scale.size()), db.s,
                          db.rows, J, db.projs, db.spans, P, ws, g_sms, row_tile, g_pdl, st);
    };
    int* counters = reinterpret_cast<int*>(ws + p.counter_off);
    ShrinkArgs sa{dx,       R,       b.n, dw,     K,      db.v_words,       vs,       vo,         db.s,
                  db.rows,  J,       p.ntiles,    p.kb_cta, p.ktb, ws + p.sw_off, ws + p.tpart_off, counters,
                  p.ncounters, db.u_words, us, uo, static_cast<int>(b.u_words.size()),
                  static_cast<int>(b.u_scale.size()), db.spans, P};
    ExpandArgs ea{dy,      dout,     ws + p.part_off, counters, R,  b.M,          db.u_words,       us,   uo,
                  db.rows, db.projs, db.spans,        dw,       P,  J,            K,                ws + p.sw_off,
                  ws + p.tpart_off, p.ks, p.ntiles, p.nsplit};
    const dim3 g1(shrink_ctas(p, K), p.ks, p.ntiles), g2(p.slots, p.nsplit, p.ntiles);
    auto s1 = [&] {
      switch (p.r_tile) {
        case 1:
          if (g1.x < static_cast<unsigned>(p.groups))
            shrink_kernel<__half, 1, true><<<g1, kThreads, p.shrink_smem, st>>>(sa);
          else
            shrink_kernel<__half, 1><<<g1, kThreads, p.shrink_smem, st>>>(sa);
          break;
        case 4: shrink_kernel<__half, 4><<<g1, kThreads, p.shrink_smem, st>>>(sa); break;
        default: shrink_kernel<__half, 16><<<g1, kThreads, p.shrink_smem, st>>>(sa); break;
      }
    };
    auto s2 = [&] {
      switch (p.r_tile) {
        // integer products where the two-kernel op takes them (launch_tiled)
        case 1: expand_kernel<__half, 1, fold_params<__half, 1>()><<<g2, kThreads, 0, st>>>(ea); break;
        case 4: expand_kernel<__half, 4, fold_params<__half, 4>()><<<g2, kThreads, 0, st>>>(ea); break;
        default: expand_kernel<__half, 16, fold_params<__half, 16>()><<<g2, kThreads, 0, st>>>(ea); break;
      }
    };
    full();
    CHECK_CUDA(cudaStreamSynchronize(st));
    const cudaGraphExec_t ge = capture(st, full);
    std::printf("R=%-2d r_tile=%-2d stage1 grid (%d,%d,%d) smem %zu | stage2 grid (%d,%d,%d) | full %.1f us, graph %.1f us,"
                " shrink %.1f us, shrink+expand %.1f us\n",
                R, p.r_tile, static_cast<int>(g1.x), p.ks, p.ntiles, p.shrink_smem, p.slots, p.nsplit, p.ntiles,
                time_it(full), time_it([&] { CHECK_CUDA(cudaGraphLaunch(ge, st)); }), time_it(s1),
                time_it([&] { s1(); s2(); }));
#ifdef DELTACOMP_SHRINK_TRACE
    if (g1.x < static_cast<unsigned>(p.groups)) shrink_trace(s1, g1, st);
#endif
    cudaGraphExecDestroy(ge);
    cudaFree(dx), cudaFree(dy), cudaFree(dout), cudaFree(dw), cudaFree(ws);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                cudaSuccess) {
    std::printf("no CUDA device: compile check only\n");
    return 0;
  }
  int major = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  g_pdl = major >= 9;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--no-pdl") g_pdl = false;
  std::printf("programmatic dependent launch: %s\n", g_pdl ? "on" : "off");
  const bool do_bench = argc > 1 && std::string(argv[1]) == "--bench";
  const bool do_quick = argc > 1 && std::string(argv[1]) == "--quick";
  if (do_quick) {  // small cases only (for compute-sanitizer)
    std::vector<Group> pairs;
    for (int vb : {1, 2, 3, 4, 8})
      for (int ub : {1, 2, 3, 4, 8}) pairs.push_back({vb, ub, 1});
    for (int R : {1, 3, 16, 17}) {
      const Bank b = build_bank(70, {45}, 1, {{pairs}}, {32}, R);
      report("quick", b, R, R % 3, run_case(b, R, R % 3, dense_weights(R, 1, R, false), R, 0.01f));
      report("quick, fused base product", b, R, R % 3,
             run_case(b, R, R % 3, dense_weights(R, 1, R, false), R + 1, 0.1f, 0, false, 0, true));
    }
  } else if (do_bench) {
    bench();
  } else if (argc > 1 && std::string(argv[1]) == "--fused-cases") {
    fused_cases();
  } else if (argc > 1 && std::string(argv[1]) == "--fused") {
    fused_bench(argc > 2 ? std::max(1, std::atoi(argv[2])) : 1, argc > 3 && std::string(argv[3]) == "one-hot");
#ifdef DELTACOMP_ROW_TRACE
  } else if (argc > 1 && std::string(argv[1]) == "--trace") {
    trace_bench(argc > 2 ? std::max(1, std::atoi(argv[2])) : 1);
#endif
  } else if (argc > 1 && std::string(argv[1]) == "--layer") {
    layer_bench(argc > 2 ? std::max(1, std::atoi(argv[2])) : 1);
  } else if (argc > 1 && std::string(argv[1]) == "--stages") {
    stages(argc > 2 ? std::atoi(argv[2]) : 0, argc > 3 ? std::max(1, std::atoi(argv[3])) : 1,
           argc > 4 ? std::atoi(argv[4]) : -1, argc > 5 ? std::clamp(std::atoi(argv[5]), 1, 3) : 3);
  } else {
    correctness();
  }
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "passed", g_failures);
  return g_failures ? 1 : 0;
}
