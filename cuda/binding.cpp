// torch binding of the delta bank dequant-matmul (kernels and launcher in delta_linear.cu) and of GPTQ's block step
// (gptq_block.cu).
//
//   delta_linear(x, y, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs, spans, row_tile)
//     -> out
//   delta_linear_base(x, weights, bias, w, v_words, ..., spans) -> out = x @ cat(weights)^T (+ bias) + the deltas
//
// x (R, n) and y (R, M): float16, bfloat16 or float32 (the same); w (R, k) float32; the bank in layout 2
// (deltacomp/kernels/bank.py). out = y + the deltas' contribution, a new (R, M) tensor of y's dtype. row_tile caps
// the kernels' token-row tile (0: chosen by the row count; 1 for a multi-tenant batch, where each row has its own
// delta). On compute capability 9.0 and later the kernels use programmatic dependent launch unless the environment
// sets DELTACOMP_CUDA_PDL=0.
// Everything must be contiguous and on x's CUDA device. The op launches on the current stream, never synchronises and
// never reads device memory on the host, so it can be captured in a CUDA graph.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "delta_linear.h"
#include "gptq_block.h"

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>


namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();

// Messages are built from strings only: numbers go through std::to_string. (Inserting an integer into the message
// stream from a just-in-time built extension was seen to crash inside libstdc++'s number formatting on a CUDA 13
// image, which would turn every failed check into a segmentation fault.)
std::string num(int64_t v) { return std::to_string(v); }
std::string shape(const torch::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + num(t.size(d));
  return out + "]";
}
std::string device_name(const torch::Tensor& t) { return t.device().str(); }

// Contiguous, on the device of the op's first argument (`first`), of the given dtype and number of dimensions.
void check_tensor(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t dim,
                  const torch::Device& device, const char* op = "delta_linear", const char* first = "x") {
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", device_name(t), " but ", first, " is on ",
              device.str());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", num(dim), "-D, got shape ", shape(t));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", shape(t), ")");
  TORCH_CHECK(t.numel() <= kMaxInt, op, ": ", name, " has ", num(t.numel()),
              " elements; at most 2**31 - 1 are supported");
}

// The kernels read packed words with 16-byte loads from 16-byte aligned rows.
void check_aligned(const torch::Tensor& t, const char* name) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  TORCH_CHECK(addr % 16 == 0, "delta_linear: ", name, " must start on a 16-byte boundary (storage offset ",
              num(t.storage_offset()), " elements)");
}

int dtype_code(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return 0;
    case torch::kFloat16: return 1;
    case torch::kBFloat16: return 2;
    default: return -1;
  }
}

// The gate weights and the bank: dtypes, shapes and devices as the kernels read them (x already checked).
void check_bank(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& v_words,
                const torch::Tensor& v_scale, const torch::Tensor& v_offset, const torch::Tensor& u_words,
                const torch::Tensor& u_scale, const torch::Tensor& u_offset, const torch::Tensor& s,
                const torch::Tensor& rows, const torch::Tensor& projs, const torch::Tensor& spans) {
  const torch::Device device = x.device();
  check_tensor(w, "w", torch::kFloat32, 2, device);
  TORCH_CHECK(w.size(0) == x.size(0), "delta_linear: w has ", num(w.size(0)), " rows but x has ", num(x.size(0)));
  check_tensor(rows, "rows", torch::kInt32, 2, device);
  TORCH_CHECK(rows.size(1) == 8, "delta_linear: rows must be (J, 8), got shape ", shape(rows));
  check_tensor(projs, "projs", torch::kInt32, 2, device);
  TORCH_CHECK(projs.size(1) == 4, "delta_linear: projs must be (P, 4), got shape ", shape(projs));
  const int64_t J = rows.size(0), P = projs.size(0);
  check_tensor(spans, "spans", torch::kInt32, 2, device);
  TORCH_CHECK(spans.size(0) == P && spans.size(1) == w.size(1) + 1, "delta_linear: spans must be (P, k + 1) = (",
              num(P), ", ", num(w.size(1) + 1), ") for ", num(P), " projections and ", num(w.size(1)),
              " deltas, got shape ", shape(spans));
  check_tensor(s, "s", torch::kFloat32, 1, device);
  TORCH_CHECK(s.size(0) == J, "delta_linear: s has ", num(s.size(0)), " values but rows has ", num(J),
              " rank rows");
  check_tensor(v_words, "v_words", torch::kInt32, 1, device);
  check_tensor(u_words, "u_words", torch::kInt32, 1, device);
  check_aligned(v_words, "v_words");
  check_aligned(u_words, "u_words");
  check_tensor(v_scale, "v_scale", torch::kFloat16, 1, device);
  check_tensor(v_offset, "v_offset", torch::kFloat16, 1, device);
  check_tensor(u_scale, "u_scale", torch::kFloat16, 1, device);
  check_tensor(u_offset, "u_offset", torch::kFloat16, 1, device);
  TORCH_CHECK(v_scale.numel() == v_offset.numel(), "delta_linear: v_scale has ", num(v_scale.numel()),
              " values but v_offset has ", num(v_offset.numel()));
  TORCH_CHECK(u_scale.numel() == u_offset.numel(), "delta_linear: u_scale has ", num(u_scale.numel()),
              " values but u_offset has ", num(u_offset.numel()));
}

// x: a CUDA tensor of a supported dtype, 2-D and contiguous; returns its dtype code.
int check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "delta_linear: x must be a CUDA tensor, got one on ", device_name(x));
  const int dtype = dtype_code(x.scalar_type());
  TORCH_CHECK(dtype >= 0, "delta_linear: x must be float16, bfloat16 or float32, got ", c10::toString(x.scalar_type()));
  TORCH_CHECK(x.dim() == 2, "delta_linear: x must be 2-D (R, n), got shape ", shape(x));
  check_tensor(x, "x", x.scalar_type(), 2, x.device());
  return dtype;
}

struct Launch {  // what both ops launch with: the device's SM count, PDL on or off, the workspace, the stream
  int num_sms;
  bool pdl;
  torch::Tensor workspace;
  cudaStream_t stream;
};

// The launch of an op on x's device (current) for these shapes; fused: the form with the base product.
Launch launch_for(const torch::Tensor& x, int64_t R, int64_t n, int64_t M, int64_t J, int64_t P, int64_t row_tile,
                  bool fused, int64_t col_len = 0, int64_t K = 1) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const char* pdl_env = std::getenv("DELTACOMP_CUDA_PDL");
  const int num_sms = props->multiProcessorCount;
  const size_t floats =
      deltacomp::delta_linear_workspace_floats(R, n, M, J, P, num_sms, row_tile, fused, col_len, K);
  return {num_sms, props->major >= 9 && !(pdl_env != nullptr && std::string(pdl_env) == "0"),
          torch::empty({static_cast<int64_t>(floats > 0 ? floats : 1)}, x.options().dtype(torch::kFloat32)),
          at::cuda::getCurrentCUDAStream()};
}

// The fused op's stage 1 counters: one int32 buffer per (device, stream, graph capture), zeroed when made. Each call
// leaves its counters zero again and the calls sharing a buffer run in order (one stream eagerly, or one captured
// graph, whose replays do not overlap), so a buffer is never zeroed again. Made during a capture, its zeroing is
// captured too and runs again at each replay, before its first use there. A buffer outgrown stays allocated, since a
// graph captured before may still use it.
int* ready_for(const torch::Tensor& x, size_t count, cudaStream_t stream) {
  if (count == 0) return nullptr;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture = 0;
  TORCH_CHECK(cudaStreamGetCaptureInfo(stream, &status, &capture) == cudaSuccess,
              "delta_linear_base: cannot query the stream's capture state");
  if (status != cudaStreamCaptureStatusActive) capture = 0;
  static std::mutex mu;
  // (never destroyed: the tensors must not be freed after the CUDA runtime at exit)
  static auto* buffers = new std::map<std::tuple<int, cudaStream_t, unsigned long long>, std::vector<torch::Tensor>>();
  const std::lock_guard<std::mutex> lock(mu);
  std::vector<torch::Tensor>& held = (*buffers)[{x.get_device(), stream, capture}];  // the last is the current one
  if (held.empty() || static_cast<size_t>(held.back().numel()) < count)
    held.push_back(torch::zeros({static_cast<int64_t>(count)}, x.options().dtype(torch::kInt32)));
  return held.back().data_ptr<int32_t>();
}

}  // namespace

torch::Tensor delta_linear_cuda(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& w,
                                const torch::Tensor& v_words, const torch::Tensor& v_scale,
                                const torch::Tensor& v_offset, const torch::Tensor& u_words,
                                const torch::Tensor& u_scale, const torch::Tensor& u_offset, const torch::Tensor& s,
                                const torch::Tensor& rows, const torch::Tensor& projs, const torch::Tensor& spans,
                                int64_t row_tile) {
  const int dtype = check_x(x);
  const torch::Device device = x.device();
  TORCH_CHECK(y.dim() == 2, "delta_linear: y must be 2-D (R, M), got shape ", shape(y));
  TORCH_CHECK(y.size(0) == x.size(0), "delta_linear: y has ", num(y.size(0)), " rows but x has ", num(x.size(0)));
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "delta_linear: y has dtype ", c10::toString(y.scalar_type()),
              " but x has ", c10::toString(x.scalar_type()));
  check_tensor(y, "y", x.scalar_type(), 2, device);
  check_bank(x, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs, spans);

  const int64_t R = x.size(0), n = x.size(1), M = y.size(1), K = w.size(1), J = rows.size(0), P = projs.size(0);
  TORCH_CHECK(P > 0 || M == 0, "delta_linear: projs is empty but y has ", num(M), " columns to cover");
  TORCH_CHECK(row_tile >= 0, "delta_linear: row_tile must be 0 (automatic) or positive, got ", num(row_tile));
  int64_t tile = 16;  // the largest row tile the kernels may use (grid.z holds at most 65535 tiles)
  while (row_tile > 0 && tile > row_tile) tile /= 2;
  TORCH_CHECK(R <= 65535 * tile, "delta_linear: x has ", num(R), " rows; at most ", num(65535 * tile),
              " are supported with row_tile ", num(row_tile));

  c10::cuda::CUDAGuard guard(device);
  torch::Tensor out = torch::empty_like(y);
  if (R == 0 || M == 0) return out;

  Launch ls = launch_for(x, R, n, M, J, P, row_tile, false);
  const cudaError_t err = deltacomp::delta_linear_launch(
      dtype, x.data_ptr(), y.data_ptr(), out.data_ptr(), R, n, M, w.data_ptr<float>(), K,
      v_words.data_ptr<int32_t>(), v_scale.data_ptr(), v_offset.data_ptr(), u_words.data_ptr<int32_t>(),
      u_scale.data_ptr(), u_offset.data_ptr(), u_words.numel(), u_scale.numel(), s.data_ptr<float>(),
      rows.data_ptr<int32_t>(), J, projs.data_ptr<int32_t>(), spans.data_ptr<int32_t>(), P,
      ls.workspace.data_ptr<float>(), ls.num_sms, row_tile, ls.pdl, ls.stream);
  TORCH_CHECK(err == cudaSuccess, "delta_linear: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// out = x @ cat(weights)^T (+ bias) + the bank's contribution, one launch sequence: weights[p] (out_len_p, n) is
// projection p's base weight (x's dtype, at most 8 projections, their rows covering the bank's outputs in order),
// bias (M,) or none.
torch::Tensor delta_linear_base_cuda(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                                     const std::optional<torch::Tensor>& bias, const torch::Tensor& w,
                                     const torch::Tensor& v_words, const torch::Tensor& v_scale,
                                     const torch::Tensor& v_offset, const torch::Tensor& u_words,
                                     const torch::Tensor& u_scale, const torch::Tensor& u_offset,
                                     const torch::Tensor& s, const torch::Tensor& rows, const torch::Tensor& projs,
                                     const torch::Tensor& spans, const std::optional<torch::Tensor>& u_cols,
                                     const std::optional<torch::Tensor>& u_desc,
                                     const std::optional<torch::Tensor>& u_pair,
                                     const std::optional<torch::Tensor>& u_colinfo, int64_t col_len) {
  const int dtype = check_x(x);
  const torch::Device device = x.device();
  check_bank(x, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs, spans);
  const int64_t R = x.size(0), n = x.size(1), K = w.size(1), J = rows.size(0), P = projs.size(0);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == P, "delta_linear_base: ", num(weights.size()),
              " base weights for a bank of ", num(P), " projections");
  TORCH_CHECK(P >= 1 && P <= 8, "delta_linear_base: at most 8 projections are supported, got ", num(P));
  // (projs is not read on the host: the caller matches the weights' rows to the projections' outputs, and the
  // kernel never reads past a weight's rows.)
  std::vector<const void*> base(P);
  std::vector<int64_t> base_rows(P);
  int64_t M = 0;
  for (int64_t p = 0; p < P; ++p) {
    const torch::Tensor& t = weights[p];
    const std::string name = "base weight " + num(p);
    check_tensor(t, name.c_str(), x.scalar_type(), 2, device);
    TORCH_CHECK(t.size(1) == n, "delta_linear_base: ", name, " has ", num(t.size(1)), " columns but x has ", num(n));
    M += t.size(0);
    base[p] = t.data_ptr();
    base_rows[p] = t.size(0);
  }
  if (bias.has_value()) {
    check_tensor(*bias, "bias", x.scalar_type(), 1, device);
    TORCH_CHECK(bias->size(0) == M, "delta_linear_base: bias has ", num(bias->size(0)), " values for ", num(M),
                " outputs");
  }
  TORCH_CHECK(R <= 65535 * 16, "delta_linear_base: x has ", num(R), " rows; at most ", num(65535 * 16),
              " are supported");
  // U by block column (optional): used when all four are given, non-empty, and col_len > 0.
  deltacomp::ColumnU columns;
  const bool use_columns = col_len > 0 && u_cols.has_value() && u_desc.has_value() && u_pair.has_value() &&
                           u_colinfo.has_value() && u_cols->numel() > 0;
  if (use_columns) {
    check_tensor(*u_cols, "u_cols", torch::kInt32, 1, device);
    check_tensor(*u_desc, "u_desc", torch::kInt32, 1, device);
    check_tensor(*u_pair, "u_pair", torch::kInt32, 1, device);
    check_tensor(*u_colinfo, "u_colinfo", torch::kInt32, 2, device);
    TORCH_CHECK(u_desc->numel() == J && u_pair->numel() == J, "delta_linear_base: u_desc and u_pair have ",
                num(u_desc->numel()), " and ", num(u_pair->numel()), " values for ", num(J), " rank rows");
    TORCH_CHECK(u_colinfo->size(0) == P * K && u_colinfo->size(1) == 3, "delta_linear_base: u_colinfo has shape ",
                shape(*u_colinfo), "; the bank has ", num(P), " projections of ", num(K),
                " deltas (want (P * k, 3))");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(u_cols->data_ptr()) % 16 == 0,
                "delta_linear_base: u_cols must start 16-byte aligned");
    TORCH_CHECK(col_len <= (1 << 20), "delta_linear_base: col_len ", num(col_len), " is over 2**20 words");
    columns = deltacomp::ColumnU{u_cols->data_ptr<int32_t>(), u_desc->data_ptr<int32_t>(),
                                 reinterpret_cast<const uint32_t*>(u_pair->data_ptr<int32_t>()),
                                 u_colinfo->data_ptr<int32_t>(), static_cast<int>(col_len)};
  }

  c10::cuda::CUDAGuard guard(device);
  torch::Tensor out = torch::empty({R, M}, x.options());
  if (R == 0 || M == 0) return out;
  const int64_t cl = use_columns ? col_len : 0;
  Launch ls = launch_for(x, R, n, M, J, P, 0, true, cl, K);
  int* ready = ready_for(x, deltacomp::delta_linear_base_ready_ints(R, n, M, J, P, ls.num_sms, cl, K), ls.stream);
  const cudaError_t err = deltacomp::delta_linear_base_launch(
      dtype, x.data_ptr(), base.data(), base_rows.data(), bias.has_value() ? bias->data_ptr() : nullptr,
      out.data_ptr(), R, n, M, w.data_ptr<float>(), K, v_words.data_ptr<int32_t>(), v_scale.data_ptr(),
      v_offset.data_ptr(), u_words.data_ptr<int32_t>(), u_scale.data_ptr(), u_offset.data_ptr(), u_words.numel(),
      u_scale.numel(), s.data_ptr<float>(), rows.data_ptr<int32_t>(), J, projs.data_ptr<int32_t>(),
      spans.data_ptr<int32_t>(), P, ls.workspace.data_ptr<float>(), ready, ls.num_sms, ls.pdl, ls.stream,
      use_columns ? &columns : nullptr);
  TORCH_CHECK(err == cudaSuccess, "delta_linear_base: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// GPTQ's block step over columns [start, start + width) (gptq_block.h): writes those columns of codes, returns the
// block's errors (R, width). w, scale, offset, maxq and codes are (R, C), hinv (C, C), all float32 on w's device.
torch::Tensor gptq_block_cuda(const torch::Tensor& w, const torch::Tensor& hinv, const torch::Tensor& scale,
                              const torch::Tensor& offset, const torch::Tensor& maxq, torch::Tensor& codes,
                              int64_t start, int64_t width) {
  TORCH_CHECK(w.is_cuda(), "gptq_block: w must be a CUDA tensor, got one on ", device_name(w));
  const torch::Device device = w.device();
  check_tensor(w, "w", torch::kFloat32, 2, device, "gptq_block", "w");
  const int64_t R = w.size(0), C = w.size(1);
  check_tensor(hinv, "hinv", torch::kFloat32, 2, device, "gptq_block", "w");
  TORCH_CHECK(hinv.size(0) == C && hinv.size(1) == C, "gptq_block: hinv must be (", num(C), ", ", num(C),
              ") for w of ", num(C), " columns, got shape ", shape(hinv));
  const std::pair<const torch::Tensor*, const char*> same[] = {
      {&scale, "scale"}, {&offset, "offset"}, {&maxq, "maxq"}, {&codes, "codes"}};
  for (const auto& [t, name] : same) {
    check_tensor(*t, name, torch::kFloat32, 2, device, "gptq_block", "w");
    TORCH_CHECK(t->size(0) == R && t->size(1) == C, "gptq_block: ", name, " must have w's shape ", shape(w),
                ", got ", shape(*t));
  }
  TORCH_CHECK(width >= 1 && width <= deltacomp::kGptqBlock, "gptq_block: width must be 1 to ",
              num(deltacomp::kGptqBlock), ", got ", num(width));
  TORCH_CHECK(start >= 0 && start + width <= C, "gptq_block: columns [", num(start), ", ", num(start + width),
              ") are not within w's ", num(C));
  c10::cuda::CUDAGuard guard(device);
  torch::Tensor err = torch::empty({R, width}, w.options());
  const cudaError_t status = deltacomp::gptq_block_launch(
      w.data_ptr<float>(), hinv.data_ptr<float>(), scale.data_ptr<float>(), offset.data_ptr<float>(),
      maxq.data_ptr<float>(), codes.data_ptr<float>(), err.data_ptr<float>(), R, C, start, static_cast<int>(width),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "gptq_block: kernel launch failed: ", cudaGetErrorString(status));
  return err;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Dequant-matmul of packed low-rank deltas (bank layout 2)";
  m.def("delta_linear", &delta_linear_cuda,
        "out = y + sum_j (x @ V_j) * s_j * w[:, delta_j] * U_j per projection, reading bit-packed factors",
        py::arg("x"), py::arg("y"), py::arg("w"), py::arg("v_words"), py::arg("v_scale"), py::arg("v_offset"),
        py::arg("u_words"), py::arg("u_scale"), py::arg("u_offset"), py::arg("s"), py::arg("rows"),
        py::arg("projs"), py::arg("spans"), py::arg("row_tile") = 0);
  m.def("delta_linear_base", &delta_linear_base_cuda,
        "out = x @ cat(weights)^T (+ bias) + the bank's contribution: the base product computed beside the delta",
        py::arg("x"), py::arg("weights"), py::arg("bias"), py::arg("w"), py::arg("v_words"), py::arg("v_scale"),
        py::arg("v_offset"), py::arg("u_words"), py::arg("u_scale"), py::arg("u_offset"), py::arg("s"),
        py::arg("rows"), py::arg("projs"), py::arg("spans"), py::arg("u_cols") = py::none(),
        py::arg("u_desc") = py::none(), py::arg("u_pair") = py::none(), py::arg("u_colinfo") = py::none(),
        py::arg("col_len") = 0);
  m.def("gptq_block", &gptq_block_cuda,
        "GPTQ's block step over columns [start, start + width): writes codes there, returns the errors (R, width)",
        py::arg("w"), py::arg("hinv"), py::arg("scale"), py::arg("offset"), py::arg("maxq"), py::arg("codes"),
        py::arg("start"), py::arg("width"));
  m.def("layout_version", [] { return 2; }, "The bank layout the kernels read");
  m.def("op_version", [] { return 5; },
        "The ops' argument lists: 2 adds spans and row_tile, 3 delta_linear_base, 4 its U by block column, "
        "5 gptq_block");
}
