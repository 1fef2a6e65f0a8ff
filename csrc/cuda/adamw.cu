// CUDA glue for the fused AdamW ops: checks, the per-tensor descriptor array (uploaded from pinned memory
// without a host synchronisation), the current stream, dtype dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../adamw_args.h"
#include "dispatch.h"
#include "qlora/adamw.cuh"

namespace qlora {
namespace {

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Copies the descriptors to the device on the current stream. The pinned staging buffer goes back to the
// caching host allocator, which reuses it only after the copy has completed, so nothing waits on the host.
template <typename Desc>
at::Tensor upload(const std::vector<Desc>& descs, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(descs.size() * sizeof(Desc));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), descs.data(), bytes);
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

// lr from a CPU tensor is read here (no device synchronisation); from a device tensor the kernel reads it.
AdamWHyper hyper(double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                 double weight_decay, at::Tensor& lr_keep) {
  AdamWHyper h{lr, nullptr, beta1, beta2, eps, weight_decay};
  if (lr_tensor.has_value()) {
    if (lr_tensor->is_cpu()) {
      h.lr = lr_tensor->item<double>();
    } else {
      lr_keep = lr_tensor->to(at::kDouble).contiguous();
      h.lr_device = lr_keep.const_data_ptr<double>();
    }
  }
  return h;
}

// Descriptors of the non-empty tensors, in order, and the total of their work units (unit_size elements
// each). p, g, step, n and the unit range are set here; fill(desc, i) sets the state pointers and the
// vectorized flag. Strided gradients are copied into `keep`, which must live until the launch is queued.
template <typename Desc, typename Fill>
std::vector<Desc> describe(at::TensorList params, at::TensorList grads, at::TensorList steps, int64_t unit_size,
                           std::vector<at::Tensor>& keep, int64_t& units, Fill fill) {
  std::vector<Desc> descs;
  units = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    keep.push_back(grads[i].contiguous());
    Desc d{};
    d.p = params[i].data_ptr();
    d.g = keep.back().const_data_ptr();
    d.step = steps[i].const_data_ptr<float>();
    d.n = n;
    d.first_unit = units;
    d.end_unit = units + (n + unit_size - 1) / unit_size;
    units = d.end_unit;
    fill(d, i);
    descs.push_back(d);
  }
  return descs;
}

void adamw_32bit_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                      double eps, double weight_decay, const std::optional<at::Tensor>& lr_tensor) {
  const at::ScalarType dtype = check_adamw_32bit_args(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2,
                                                      eps, weight_decay, lr_tensor);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> keep;
  int64_t units = 0;
  const std::vector<AdamW32Tensor> descs =
      describe<AdamW32Tensor>(params, grads, steps, kAdamWChunk, keep, units, [&](AdamW32Tensor& d, size_t i) {
        d.exp_avg = exp_avgs[i].data_ptr<float>();
        d.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
        d.vectorized = aligned(d.p, 16) && aligned(d.g, 16) && aligned(d.exp_avg, 16) && aligned(d.exp_avg_sq, 16);
      });
  if (descs.empty()) return;
  at::Tensor lr_keep;
  const AdamWHyper h = hyper(lr, lr_tensor, beta1, beta2, eps, weight_decay, lr_keep);
  const at::Tensor table = upload(descs, params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(launch_adamw_32bit<T>(static_cast<const AdamW32Tensor*>(table.const_data_ptr()), units, h, stream));
  });
}

void adamw_8bit_blockwise_cuda(at::TensorList params, at::TensorList grads, at::TensorList state1,
                               at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                               const at::Tensor& qmap1, const at::Tensor& qmap2, at::TensorList steps, double lr,
                               double beta1, double beta2, double eps, double weight_decay,
                               const std::optional<at::Tensor>& lr_tensor) {
  const at::ScalarType dtype = check_adamw_8bit_args(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                                     steps, lr, beta1, beta2, eps, weight_decay, lr_tensor);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> keep;
  int64_t units = 0;
  const std::vector<AdamW8Tensor> descs =
      describe<AdamW8Tensor>(params, grads, steps, kOptimizerBlocksize, keep, units, [&](AdamW8Tensor& d, size_t i) {
        d.state1 = state1[i].data_ptr<uint8_t>();
        d.state2 = state2[i].data_ptr<uint8_t>();
        d.absmax1 = absmax1[i].data_ptr<float>();
        d.absmax2 = absmax2[i].data_ptr<float>();
        d.vectorized = aligned(d.p, 16) && aligned(d.g, 16) && aligned(d.state1, 8) && aligned(d.state2, 8);
      });
  if (descs.empty()) return;
  at::Tensor lr_keep;
  const AdamWHyper h = hyper(lr, lr_tensor, beta1, beta2, eps, weight_decay, lr_keep);
  const at::Tensor q1 = qmap1.contiguous(), q2 = qmap2.contiguous();
  const at::Tensor table = upload(descs, params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(launch_adamw_8bit_blockwise<T>(static_cast<const AdamW8Tensor*>(table.const_data_ptr()), units,
                                                  q1.const_data_ptr<float>(), q2.const_data_ptr<float>(), h, stream));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("adamw_32bit", &adamw_32bit_cuda);
  m.impl("adamw_8bit_blockwise", &adamw_8bit_blockwise_cuda);
}

}  // namespace qlora
