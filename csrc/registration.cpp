// Every qlora operator schema, in one place. Implementations register per backend in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd live in python/qlora/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(qlora, m) {
  // Blockwise 4-bit quantization: packed codes [(numel+1)//2, 1] uint8 and one float32 absmax per block.
  m.def("quantize_4bit(Tensor A, int blocksize=64, str quant_type=\"nf4\") -> (Tensor packed, Tensor absmax)");
  // Second-level quantization of the absmax: absmax - mean as 8-bit codes of `code` in blocks of 256.
  m.def("double_quantize(Tensor absmax, Tensor code) -> (Tensor qabsmax, Tensor absmax2, Tensor offset)");
  // Inverse of quantize_4bit; a uint8 absmax is double-quantized and needs absmax2, code2 and offset.
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype, Tensor? absmax2=None, Tensor? code2=None, Tensor? offset=None) -> Tensor");

  // ---- fused 4-bit linear + LoRA ----
  // y = x·dequant(W)ᵀ + scale·(x_lora·lora_Aᵀ)·lora_Bᵀ + bias, W given as dequantize_4bit's arguments with
  // shape = [out_features, in_features]; x_lora (x after LoRA dropout) defaults to x; lora_A/lora_B/bias are
  // optional. path: 0 chooses by M; 1 (fused small-M kernel) and 2 (dequantize + GEMM) are for benchmarking.
  m.def(
      "lora_linear_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "Tensor? absmax2=None, Tensor? code2=None, Tensor? offset=None, Tensor? bias=None, Tensor? lora_A=None, "
      "Tensor? lora_B=None, float scale=1.0, Tensor? x_lora=None, int path=0) -> Tensor");
}
