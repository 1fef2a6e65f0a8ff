// Autograd for lora_linear_4bit, in C++: a training step calls the op for every linear layer (twice with
// gradient checkpointing), and a Python autograd wrapper cost tens of microseconds of host time per call,
// enough to leave the GPU idle between small kernels. Registered for the Autograd key, so it also serves
// LibTorch programs, and torch.compile traces through it.
//
// Backward: grad_x = g·dequant(W) + s·(g·B)·A, grad_A = s·(g·B)ᵀ·x_lora, grad_B = s·gᵀ·(x_lora·Aᵀ),
// grad_bias = Σg. Only the packed weight and the LoRA input are saved, never a dequantized copy of W.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "dequantize_4bit_op.h"
#include "lora_linear_4bit_args.h"

namespace qlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

at::Tensor lora_linear_4bit_below_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                           int64_t blocksize, const std::string& quant_type,
                                           c10::SymIntArrayRef shape, const OptTensor& absmax2,
                                           const OptTensor& code2, const OptTensor& offset, const OptTensor& bias,
                                           const OptTensor& lora_A, const OptTensor& lora_B, double scale,
                                           const OptTensor& x_lora, int64_t path) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::lora_linear_4bit", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const std::string&,
                            c10::SymIntArrayRef, const OptTensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, double, const OptTensor&,
                            int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, packed, absmax, blocksize, quant_type, shape, absmax2, code2, offset, bias, lora_A, lora_B,
                 scale, x_lora, path);
}

OptTensor none_if_undefined(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
at::Tensor defined_or_empty(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// The op's 15 arguments, in schema order; the differentiable ones.
enum Argument { kX = 0, kBias = 9, kLoraA = 10, kLoraB = 11, kXLora = 13, kNumArguments = 15 };

class LoraLinear4bitFunction : public torch::autograd::Function<LoraLinear4bitFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, int64_t blocksize, const std::string& quant_type,
                            c10::SymIntArrayRef shape, const OptTensor& absmax2, const OptTensor& code2,
                            const OptTensor& offset, const OptTensor& bias, const OptTensor& lora_A,
                            const OptTensor& lora_B, double scale, const OptTensor& x_lora, int64_t path) {
    // needs_input_grad counts only the tensor arguments that are present, in order.
    int edge = 0;
    const auto edge_of = [&edge](bool present) -> int64_t { return present ? edge++ : -1; };
    const int64_t x_edge = edge_of(true);
    edge_of(true);  // packed
    edge_of(true);  // absmax
    edge_of(absmax2.has_value() && absmax2->defined());
    edge_of(code2.has_value() && code2->defined());
    edge_of(offset.has_value() && offset->defined());
    const int64_t bias_edge = edge_of(bias.has_value() && bias->defined());
    const int64_t a_edge = edge_of(lora_A.has_value() && lora_A->defined());
    const int64_t b_edge = edge_of(lora_B.has_value() && lora_B->defined());
    const int64_t x_lora_edge = edge_of(x_lora.has_value() && x_lora->defined());

    const bool has_lora = lora_A.has_value() && lora_A->defined();
    ctx->saved_data["edges"] = std::vector<int64_t>{x_edge, bias_edge, a_edge, b_edge, x_lora_edge};
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["quant_type"] = quant_type;
    ctx->saved_data["shape"] = shape;
    ctx->saved_data["scale"] = scale;
    const at::Tensor lora_input = has_lora ? (x_lora_edge >= 0 ? *x_lora : x) : at::Tensor();
    ctx->save_for_backward({lora_input, packed, absmax, defined_or_empty(absmax2), defined_or_empty(code2),
                            defined_or_empty(offset), defined_or_empty(lora_A), defined_or_empty(lora_B)});
    return lora_linear_4bit_below_autograd(x, packed, absmax, blocksize, quant_type, shape, absmax2, code2, offset,
                                           bias, lora_A, lora_B, scale, x_lora, path);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &lora_input = saved[0], &packed = saved[1], &absmax = saved[2], &absmax2 = saved[3],
                     &code2 = saved[4], &offset = saved[5], &lora_A = saved[6], &lora_B = saved[7];
    const std::vector<int64_t> edges = ctx->saved_data["edges"].toIntVector();
    const auto needs = [&](int which) { return edges[which] >= 0 && ctx->needs_input_grad(edges[which]); };
    const bool need_x = needs(0), need_bias = needs(1), need_a = needs(2), need_b = needs(3), need_x_lora = needs(4);
    const std::vector<c10::SymInt> shape = ctx->saved_data["shape"].toSymIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();

    const at::Tensor& grad = grad_outputs[0];
    const c10::SymInt& N = shape[0];
    const c10::SymInt& K = shape[1];
    const at::Tensor g = grad.reshape_symint({-1, N});
    variable_list grads(kNumArguments);
    const int64_t blocksize = ctx->saved_data["blocksize"].toInt();
    const std::string& quant_type = ctx->saved_data["quant_type"].toStringRef();
    const bool separate_x_lora = edges[4] >= 0;
    // Where the LoRA branch reads x itself, grad_x = g·(W + s·B·A): on the GPU, for large M, the adapter is merged
    // into the dequantized workspace (dequantize_4bit_lora) rather than added by two low-rank GEMMs over g, grad_x.
    // The two round differently, so with symbolic sizes (torch.compile) the choice is a guard, not a guess.
    const bool merged = need_x && grad.is_cuda() && lora_A.defined() &&
                        can_merge_adapter(!separate_x_lora, grad.scalar_type(), K.guard_int(__FILE__, __LINE__),
                                          lora_A.sym_size(0).guard_int(__FILE__, __LINE__)) &&
                        merging_adapter_rows_pay(g.sym_size(0), N, K);
    at::Tensor grad_x;
    if (lora_A.defined()) {
      const at::Tensor xl = lora_input.reshape_symint({-1, K});
      if (need_a || (need_x && !merged) || (separate_x_lora && need_x_lora)) {
        const at::Tensor gb = at::mm(g, lora_B).mul_(scale);  // s·g·B, [M, r]
        if (separate_x_lora && need_x_lora) grads[kXLora] = at::mm(gb, lora_A).view_symint(lora_input.sym_sizes());
        // The low-rank part first: the large GEMM below then accumulates onto it (beta = 1) instead of a rank-r
        // update reading and writing all of grad_x once more.
        if (!separate_x_lora && need_x && !merged) grad_x = at::mm(gb, lora_A);
        if (need_a) grads[kLoraA] = at::mm(gb.t(), xl);
      }
      if (need_b) grads[kLoraB] = at::mm(g.t(), at::mm(xl, lora_A.t()).mul_(scale));
    }
    if (need_x) {
      // Dequantized into a temporary the caching allocator reuses, then one GEMM.
      const at::Tensor w =
          merged ? call_dequantize_4bit_lora(packed, absmax, blocksize, quant_type, shape, grad.scalar_type(), lora_A,
                                             lora_B, scale, none_if_undefined(absmax2), none_if_undefined(code2),
                                             none_if_undefined(offset))
                 : call_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, grad.scalar_type(),
                                        none_if_undefined(absmax2), none_if_undefined(code2),
                                        none_if_undefined(offset));
      grad_x = grad_x.defined() ? grad_x.addmm_(g, w) : at::mm(g, w);
    }
    if (grad_x.defined()) {
      std::vector<c10::SymInt> x_shape(grad.sym_sizes().begin(), grad.sym_sizes().end() - 1);
      x_shape.push_back(K);
      grads[kX] = grad_x.view_symint(x_shape);
    }
    if (need_bias) grads[kBias] = g.sum(0);
    return grads;
  }
};

at::Tensor lora_linear_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t blocksize, const std::string& quant_type, c10::SymIntArrayRef shape,
                                     const OptTensor& absmax2, const OptTensor& code2, const OptTensor& offset,
                                     const OptTensor& bias, const OptTensor& lora_A, const OptTensor& lora_B,
                                     double scale, const OptTensor& x_lora, int64_t path) {
  // Nothing to differentiate (inference, decoding): no autograd node, whose context and saved tensors cost host
  // time on every call.
  const auto requires_grad = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || absmax.requires_grad() || requires_grad(absmax2) || requires_grad(code2) || requires_grad(offset) ||
        requires_grad(bias) || requires_grad(lora_A) || requires_grad(lora_B) || requires_grad(x_lora)))
    return lora_linear_4bit_below_autograd(x, packed, absmax, blocksize, quant_type, shape, absmax2, code2, offset,
                                           bias, lora_A, lora_B, scale, x_lora, path);
  return LoraLinear4bitFunction::apply(x, packed, absmax, blocksize, quant_type, shape, absmax2, code2, offset, bias,
                                       lora_A, lora_B, scale, x_lora, path);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) { m.impl("lora_linear_4bit", &lora_linear_4bit_autograd); }

}  // namespace qlora
