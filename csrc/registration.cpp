// Every qlora operator schema, in one place. Implementations register per backend in csrc/cpu and
// csrc/cuda, lora_linear_4bit's autograd in csrc/lora_linear_4bit_autograd.cpp; fake (meta) kernels live in
// python/qlora/_ops.py.
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
  // dequant(W) + scale·lora_B·lora_A for a 2-D shape [N, K] (lora_A [r, K], lora_B [N, r], all of dtype), summed in
  // float32 and rounded once: the weight with a LoRA adapter merged in.
  m.def(
      "dequantize_4bit_lora(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype, Tensor lora_A, Tensor lora_B, float scale, Tensor? absmax2=None, Tensor? code2=None, "
      "Tensor? offset=None) -> Tensor");

  // The packed bytes of a 4-bit weight [N, K] in tile order ([N / 16, K / 64, 512], qlora/tile_order.h: the order the
  // CUDA kernels read fastest) and back to bitsandbytes' row-major [(N·K) / 2, 1]. Every op that takes `packed`
  // accepts either order.
  m.def("tile_order_4bit(Tensor packed, int[] shape) -> Tensor");
  m.def("row_order_4bit(Tensor packed) -> Tensor");

  // ---- fused 4-bit linear + LoRA ----
  // y = x·dequant(W)ᵀ + scale·(x_lora·lora_Aᵀ)·lora_Bᵀ + bias, W given as dequantize_4bit's arguments with
  // shape = [out_features, in_features]; x_lora (x after LoRA dropout) defaults to x; lora_A/lora_B/bias are
  // optional. path: 0 chooses by M; 1 (fused small-M kernel, general loop), 2 (dequantize + GEMM), 3 (fused
  // kernel, block-scaled loop where the layout allows it, as 0 takes it), 4 and 5 (dequantize + GEMM with the
  // adapter merged into the weight wherever it can be, or never), 6 (tensor-core GEMM decoding the weight in
  // its main loop; bfloat16, sm_90a) and 7 (the same with 256-token tiles) are for benchmarking.
  m.def(
      "lora_linear_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "Tensor? absmax2=None, Tensor? code2=None, Tensor? offset=None, Tensor? bias=None, Tensor? lora_A=None, "
      "Tensor? lora_B=None, float scale=1.0, Tensor? x_lora=None, int path=0) -> Tensor");
}

// ---- paged optimizers: unified memory and fused AdamW ------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(qlora, m) {
  // An uninitialised tensor in CUDA unified memory, which the driver pages between the GPU and the host
  // under memory pressure; refuses to allocate more than the GPU has free. On a GPU without concurrent
  // managed access it warns and returns ordinary device memory; on the CPU it is an ordinary tensor.
  m.def("paged_empty(SymInt[] size, ScalarType dtype, Device device) -> Tensor");
  // Migrates a paged tensor's pages to its GPU (to_device) or to the host, ordered on the current stream.
  // A no-op for tensors that are not paged.
  m.def("paged_prefetch(Tensor t, bool to_device=True) -> ()");
  // Sets the preferred location of a paged tensor's pages: "device", "host", or "none" to clear it.
  m.def("paged_advise(Tensor t, str location=\"device\") -> ()");
  // Whether a tensor lives in unified memory.
  m.def("is_paged(Tensor t) -> bool");
  // One AdamW step over many tensors with float32 states; steps[i] is tensor i's step count, already
  // incremented. lr_tensor, when given, overrides lr. Elements whose gradient is not finite are skipped.
  m.def(
      "adamw_32bit(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "Tensor? lr_tensor=None) -> ()");
  // The same with 8-bit blockwise states in bitsandbytes' layout: state1/state2 uint8 codes of qmap1 (signed)
  // and qmap2 (unsigned dynamic code), absmax1/absmax2 one float32 per block of 256 elements.
  m.def(
      "adamw_8bit_blockwise(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, "
      "Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor qmap2, Tensor[] steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, Tensor? lr_tensor=None) -> ()");
}
