import torch, qlora
w = torch.randn(64, 64, device="cuda")
for bs, qt in [(64, "int4"), (48, "nf4")]:
    try:
        torch.ops.qlora.quantize_4bit(w, bs, qt)
    except Exception as e:
        print(type(e).__name__, str(e).splitlines()[0])
print("no crash")
