"""Build llama.cpp for the bench from the `llama-cpp-python` source distribution's vendored tree.

`python -m bench.llamacpp_build` downloads the sdist with pip (once), unpacks its
`vendor/llama.cpp`, patches it (`PATCHES`) and builds the tools the bench runs into
`bench/results/llamacpp/build/bin` (git-ignored), Release with `GGML_NATIVE=ON` so ggml uses this
CPU's vector extensions. Every step is skipped when its output exists (the programs too:
`--rebuild` builds them again), so running it again is cheap, and a copy of, or a link to,
another checkout's `bench/results/llamacpp` serves as it is. `--jobs` defaults to 2 and the
compiler runs under `nice -n 19`, as the machine is shared. Needs cmake and a C/C++ compiler
(`pip install cmake ninja` where the system has none: the `bench` extra). Bench-only: nothing in
the package or its tests uses it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results" / "llamacpp"
SDIST_DIR = ROOT / "sdist"
SOURCE = ROOT / "src"  # the vendored llama.cpp tree, unpacked
SOURCE_STAMP = ".from-sdist"  # in SOURCE: the sdist it came from
BUILD = ROOT / "build"
BIN = BUILD / "bin"
PACKAGE = "llama-cpp-python"
# The programs the bench runs: speed (llama-bench), quantization, and the server (load time, first
# token, greedy tokens and log-probabilities, serve_throughput). Built in this order, so the
# first are usable while the server (the slowest to compile) still builds.
TARGETS = ("llama-quantize", "llama-bench", "llama-server")
VENDORED = "vendor/llama.cpp"

# llama.cpp's Gemma 3n hard-codes E4B/E2B's sizes: K/V is computed by the first 20 layers, the
# FFN is sparse in the first 10, per-layer inputs are 256 wide, LAuReL's rank is 64. The bench's
# reduced size (10 layers, 5 computing K/V, 3 sparse) would be a different model there and the
# tiny size (widths 16) would not load, so this patch reads them from the GGUF: what the
# converter writes (`shared_kv_layers`; `activation_sparsity_scale`, finite for a sparse layer,
# -inf for a dense one; `embedding_length_per_layer_input`) and LAuReL's weight shape. For E4B
# and E2B these say 20, 10, 256 and 64: the patched build computes exactly what the unpatched
# one does, so full-size figures are upstream's.
PATCH_MARK = "bench patch (bench/llamacpp_build.py)"
PATCHES = {  # file -> (anchor, replacement): each anchor must occur exactly once
    "src/models/models.h": (
        "    void load_arch_tensors(llama_model_loader & ml) override;\n\n"
        "    struct graph : public llm_graph_context {\n"
        "        const llama_model & model;\n\n"
        "        const int64_t n_embd_head;\n"
        "        const int64_t n_embd_altup;\n"
        "        const int64_t n_altup;\n"
        "        const int     i_altup_act;\n"
        "        const int     n_layer_sparsity = 10;",
        "    void load_arch_tensors(llama_model_loader & ml) override;\n\n"
        f"    int n_layer_sparse = 10; // {PATCH_MARK}: the GGUF's count\n\n"
        "    struct graph : public llm_graph_context {\n"
        "        const llama_model & model;\n\n"
        "        const int64_t n_embd_head;\n"
        "        const int64_t n_embd_altup;\n"
        "        const int64_t n_altup;\n"
        "        const int     i_altup_act;\n"
        "        const int     n_layer_sparsity = 10;",
    ),
    "src/models/gemma3n.cpp": (
        "    hparams.n_layer_kv_from_start = 20;\n",
        "    hparams.n_layer_kv_from_start = 20;\n"
        f"    {{ // {PATCH_MARK}: the sizes the GGUF states\n"
        "        uint32_t n_kv_shared = 0;\n"
        "        if (ml.get_key(LLM_KV_ATTENTION_SHARED_KV_LAYERS, n_kv_shared, false)) {\n"
        "            hparams.n_layer_kv_from_start = hparams.n_layer() - n_kv_shared;\n"
        "        }\n"
        "        ml.get_key(LLM_KV_EMBEDDING_LENGTH_PER_LAYER, hparams.n_embd_altup, false);\n"
        "        if (const ggml_tensor * laurel = ml.get_tensor_meta(\"blk.0.laurel_l.weight\")) {\n"
        "            hparams.laurel_rank = (uint32_t) laurel->ne[1];\n"
        "        }\n"
        # llama.cpp has no key for it: read through the GGUF API.
        "        const int64_t kid = gguf_find_key(ml.metadata, \"gemma3n.activation_sparsity_scale\");\n"
        "        if (kid >= 0 && gguf_get_arr_type(ml.metadata, kid) == GGUF_TYPE_FLOAT32) {\n"
        "            const float * scale = (const float *) gguf_get_arr_data(ml.metadata, kid);\n"
        "            const int n = (int) gguf_get_arr_n(ml.metadata, kid);\n"
        "            n_layer_sparse = 0;\n"
        "            while (n_layer_sparse < n && std::isfinite(scale[n_layer_sparse])) {\n"
        "                ++n_layer_sparse;\n"
        "            }\n"
        "        }\n"
        "    }\n",
    ),
    "src/models/gemma3n.cpp ": (  # the graph takes the count from the model (same file, 2nd edit)
        "    i_altup_act(model.hparams.i_altup_act) {\n",
        "    i_altup_act(model.hparams.i_altup_act),\n"
        "    n_layer_sparsity(static_cast<const llama_model_gemma3n &>(model).n_layer_sparse) {\n",
    ),
    # ggml's AMX backend (taken for Q8_0/Q4_0 where -march=native finds AMX, as on Sapphire
    # Rapids and later Xeons) crashes llama-server in ggml_backend_amx_mul_mat as the model
    # loads (ggml-org/llama.cpp#20824, closed unfixed): the build leaves AMX out, and ggml
    # takes its AVX-512 paths (with its repacked Q4_0/Q8_0 layouts) there too. A CMake comment
    # carries the mark.
    "ggml/src/ggml-cpu/CMakeLists.txt": (
        "                list(APPEND ARCH_FLAGS -march=native)\n",
        f"                # {PATCH_MARK}: no AMX (llama.cpp#20824)\n"
        "                list(APPEND ARCH_FLAGS -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16)\n",
    ),
}


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def sdist(version: str | None) -> Path:
    """The downloaded source distribution (downloaded once)."""
    found = sorted(SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if version:
        found = [p for p in found if p.name == f"llama_cpp_python-{version}.tar.gz"]
    if found:
        return found[-1]
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    # pip prepares the sdist's metadata, in an isolated environment with its build backend
    # (scikit-build-core, from the index): a plain venv does not have it. Only the package
    # itself from source: with `--no-binary :all:` pip compiled cmake from source for that
    # environment too, over ten minutes here.
    _run([sys.executable, "-m", "pip", "download", "--no-binary", PACKAGE, "--no-deps",
          "-d", SDIST_DIR, spec])
    found = sorted(SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no llama_cpp_python sdist in {SDIST_DIR}")
    return found[-1]


def unpack(archive: Path) -> Path:
    """`SOURCE`: the sdist's vendored llama.cpp (unpacked once per sdist)."""
    stamp = SOURCE / SOURCE_STAMP
    if stamp.exists() and stamp.read_text() == archive.name:
        return SOURCE
    if SOURCE.exists():
        shutil.rmtree(SOURCE)
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/{VENDORED}/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise SystemExit(f"{archive.name} has no {VENDORED}")
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(SOURCE, members=[m for m in members if m.name], filter="data")
    stamp.write_text(archive.name)
    return SOURCE


def patch(source: Path) -> None:
    """Applies `PATCHES` once (a patched file carries `PATCH_MARK`)."""
    for name, (anchor, replacement) in PATCHES.items():
        path = source / name.strip()
        text = path.read_text()
        if replacement in text:
            continue
        if text.count(anchor) != 1:
            raise SystemExit(f"cannot patch {path}: the llama.cpp source changed (anchor not found once)")
        path.write_text(text.replace(anchor, replacement))


def build(source: Path, jobs: int) -> None:
    """Configure (once) and build `TARGETS`; the build tool skips what is up to date."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (BUILD / "CMakeCache.txt").exists():
        _run(["cmake", "-S", source, "-B", BUILD, *generator, "-DCMAKE_BUILD_TYPE=Release",
              "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DBUILD_SHARED_LIBS=OFF"])
    for target in TARGETS:
        _run(["nice", "-n", "19", "cmake", "--build", BUILD, "--config", "Release", "-j", str(jobs),
              "--target", target])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help=f"{PACKAGE} version (default: the newest on the index)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="run the build although the programs exist")
    args = parser.parse_args(argv)
    if not args.rebuild and all((BIN / t).exists() for t in TARGETS):
        print(f"llama.cpp tools already in {BIN} (--rebuild to build them again)")
        return 0
    if not shutil.which("cmake"):
        raise SystemExit("cmake not found: pip install cmake ninja (the bench extra)")
    source = unpack(sdist(args.version))
    patch(source)
    build(source, args.jobs)
    missing = [t for t in TARGETS if not (BIN / t).exists()]
    if missing:
        raise SystemExit(f"the build did not produce {', '.join(missing)} in {BIN}")
    print(f"llama.cpp tools in {BIN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
