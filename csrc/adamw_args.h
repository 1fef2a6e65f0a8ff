// Argument checks shared by the CPU and CUDA implementations of the fused AdamW ops: one wording for every
// error, each naming the argument (and the list index) at fault.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#include "qlora/adamw.h"

namespace qlora {

inline std::string item_name(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

inline void check_list_length(at::TensorList list, size_t expected, const char* name) {
  TORCH_CHECK_VALUE(list.size() == expected, name, " has ", list.size(), " tensors but params has ", expected);
}

inline void check_hyperparameters(double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK_VALUE(lr >= 0.0, "lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
}

// A state tensor: the given dtype, `numel` contiguous elements, on the parameter's device.
inline void check_state(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Tensor& param,
                        const std::string& name, const char* what) {
  TORCH_CHECK(t.device() == param.device(), name, " is on ", t.device(), " but its parameter is on ", param.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel, name, " has ", t.numel(), " elements but ", numel, " are expected ", what);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (it is updated in place)");
}

// Checks what both AdamW ops share and returns the parameters' dtype (every parameter has the same).
inline at::ScalarType check_adamw_common(at::TensorList params, at::TensorList grads, at::TensorList steps, double lr,
                                         double beta1, double beta2, double eps, double weight_decay,
                                         const std::optional<at::Tensor>& lr_tensor) {
  check_hyperparameters(lr, beta1, beta2, eps, weight_decay);
  const size_t count = params.size();
  check_list_length(grads, count, "grads");
  check_list_length(steps, count, "steps");
  if (count == 0) return at::kFloat;
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "params[0] must be float32, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.device() == params[0].device(), item_name("params", i), " is on ", p.device(), " but params[0] is on ",
                params[0].device(), "; one call updates tensors of one device");
    TORCH_CHECK_TYPE(p.scalar_type() == dtype, item_name("params", i), " is ", p.scalar_type(), " but params[0] is ",
                     dtype, "; one call updates tensors of one dtype");
    TORCH_CHECK_VALUE(p.is_contiguous(), item_name("params", i), " must be contiguous (it is updated in place)");
    TORCH_CHECK(g.device() == p.device(), item_name("grads", i), " is on ", g.device(), " but its parameter is on ",
                p.device());
    TORCH_CHECK_TYPE(g.scalar_type() == dtype, item_name("grads", i), " must have its parameter's dtype ", dtype,
                     ", got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), item_name("grads", i), " has shape ", g.sizes(),
                      " but its parameter has shape ", p.sizes());
    TORCH_CHECK_VALUE(!g.is_sparse(), item_name("grads", i), " is sparse; AdamW needs dense gradients");
    check_state(steps[i], at::kFloat, 1, p, item_name("steps", i), "(one step count per parameter)");
  }
  if (lr_tensor.has_value()) {
    const at::Tensor& t = *lr_tensor;
    TORCH_CHECK_VALUE(t.numel() == 1, "lr_tensor must hold one value, got ", t.numel());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "lr_tensor must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.is_cpu() || t.device() == params[0].device(), "lr_tensor is on ", t.device(),
                " but params are on ", params[0].device(), "; it must be on the CPU or on their device");
  }
  return dtype;
}

inline at::ScalarType check_adamw_32bit_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                             at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                                             double beta2, double eps, double weight_decay,
                                             const std::optional<at::Tensor>& lr_tensor) {
  check_list_length(exp_avgs, params.size(), "exp_avgs");
  check_list_length(exp_avg_sqs, params.size(), "exp_avg_sqs");
  const at::ScalarType dtype =
      check_adamw_common(params, grads, steps, lr, beta1, beta2, eps, weight_decay, lr_tensor);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    check_state(exp_avgs[i], at::kFloat, n, params[i], item_name("exp_avgs", i), "(one per parameter element)");
    check_state(exp_avg_sqs[i], at::kFloat, n, params[i], item_name("exp_avg_sqs", i), "(one per parameter element)");
  }
  return dtype;
}

inline at::ScalarType check_adamw_8bit_args(at::TensorList params, at::TensorList grads, at::TensorList state1,
                                            at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                                            const at::Tensor& qmap1, const at::Tensor& qmap2, at::TensorList steps,
                                            double lr, double beta1, double beta2, double eps, double weight_decay,
                                            const std::optional<at::Tensor>& lr_tensor) {
  for (auto [list, name] : {std::pair{state1, "state1"}, {state2, "state2"}, {absmax1, "absmax1"}, {absmax2, "absmax2"}})
    check_list_length(list, params.size(), name);
  const at::ScalarType dtype =
      check_adamw_common(params, grads, steps, lr, beta1, beta2, eps, weight_decay, lr_tensor);
  if (!params.empty()) {
    check_state(qmap1, at::kFloat, 256, params[0], "qmap1", "(the signed 8-bit dynamic code)");
    check_state(qmap2, at::kFloat, 256, params[0], "qmap2", "(the unsigned 8-bit dynamic code)");
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    const int64_t blocks = (n + kOptimizerBlocksize - 1) / kOptimizerBlocksize;
    check_state(state1[i], at::kByte, n, params[i], item_name("state1", i), "(one 8-bit code per parameter element)");
    check_state(state2[i], at::kByte, n, params[i], item_name("state2", i), "(one 8-bit code per parameter element)");
    check_state(absmax1[i], at::kFloat, blocks, params[i], item_name("absmax1", i), "(one per block of 256 elements)");
    check_state(absmax2[i], at::kFloat, blocks, params[i], item_name("absmax2", i), "(one per block of 256 elements)");
  }
  return dtype;
}

}  // namespace qlora
