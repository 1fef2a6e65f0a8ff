"""Instructions in each tensor-core GEMM kernel's main loop, from its SASS: a check that needs no GPU, for changes
meant to shorten the consumers' loop (each count is the smallest backward branch's span that holds the first wgmma).

    nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools -diag-suppress 177 \
         -cubin tools/xa_beside_gemm.cu -o /tmp/new.cubin
    python tools/sass_loops.py /tmp/new.cubin [/tmp/old.cubin]      # with two, the second is the baseline

cuobjdump comes from PATH, CUDA_HOME/bin or /usr/local/cuda/bin.
"""

import collections
import os
import re
import shutil
import subprocess
import sys

SHOWN = ["HGMMA", "LDS", "PRMT", "IMAD", "IADD3", "HMUL2", "HFMA2", "FFMA", "R2UR", "LOP3", "SHF"]
KERNEL = re.compile(r"gemm_4bit_kernelILN\w+QuantTypeE(\d)ELb(\d)ELi(\d+)ELi(\d)ELb(\d)ELb(\d)E")


def cuobjdump():
    for candidate in (shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"),
                      "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.path.exists(candidate):
            return candidate
    sys.exit("cuobjdump not found: put it on PATH or set CUDA_HOME")


def kernels(cubin):
    sass = subprocess.run([cuobjdump(), "-sass", cubin], check=True, capture_output=True, text=True).stdout
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        name = function.split("\n", 1)[0].strip()
        found = KERNEL.search(name)
        if not found:
            continue
        quant, double_quant, tokens, warpgroups, split, stream_k = found.groups()
        label = (f"{'FP4' if quant == '1' else 'NF4'}{' dq' if double_quant == '1' else ''} {tokens} tokens, "
                 f"{warpgroups} warpgroups, {'split' if split == '1' else 'rows'}{', stream-K' if stream_k == '1' else ''}")
        body = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(.*?);", function)]
        yield label, body


def opcode(text):
    words = text.split()
    word = words[1] if words[0].startswith("@") else words[0]
    return word.split(".")[0]


def main_loop(body):
    first = next((a for a, text in body if opcode(text) == "HGMMA"), None)
    if first is None:
        return []
    best = []
    for address, text in body:
        target = re.search(r"BRA (?:`\()?[^0-9]*0x([0-9a-f]+)", text)
        if opcode(text) == "BRA" and target and int(target.group(1), 16) <= first <= address:
            span = [t for a, t in body if int(target.group(1), 16) <= a <= address]
            if not best or len(span) < len(best):
                best = span
    return best


def loops(cubin):
    result = {}
    for label, body in kernels(cubin):
        loop = main_loop(body)
        result[label] = (len(loop), collections.Counter(opcode(t) for t in loop))
    return result


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    new = loops(sys.argv[1])
    old = loops(sys.argv[2]) if len(sys.argv) == 3 else {}
    for label, (size, ops) in new.items():
        before = f"{old[label][0]:4d} -> " if label in old else ""
        mix = " ".join(f"{op} {ops[op]}" for op in SHOWN if ops[op])
        print(f"{label:42s} {before}{size:4d}   {mix}")


if __name__ == "__main__":
    main()
