"""Seeded random Llama-shaped models written tensor by tensor, for measuring memory and speed at sizes
no download can bring here: a Hugging Face directory (bf16 safetensors, one shard per decoder layer,
model.safetensors.index.json, a BPE tokenizer trained on the C4 sample) and the same weights as a
GGUF Q8_0 file for llama.cpp. Random weights say nothing about quality; they fix memory and speed.

Memory stays at about one layer's tensors: each shard is generated, written and dropped in turn, and
the GGUF is written header first, then tensor by tensor, read back from the shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Shape", "LLAMA2_7B", "SMALL", "write_hf_model", "write_gguf_q8_0", "tensor_shapes"]


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 4096


LLAMA2_7B = Shape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
SMALL = Shape(hidden=128, layers=3, intermediate=256, heads=4, kv_heads=2, vocab=400, max_positions=512)
DONE = ".edgeweave-synthetic.json"  # written last: a directory without it is incomplete


def _config(s: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                       max_position_embeddings=s.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def tensor_shapes(s: Shape) -> Iterator[tuple[int | None, str, tuple[int, ...]]]:
    """(layer or None, transformers name, shape) in file order: the embedding first, the head last."""
    hd = s.hidden // s.heads
    yield None, "model.embed_tokens.weight", (s.vocab, s.hidden)
    for i in range(s.layers):
        p = f"model.layers.{i}."
        yield i, p + "input_layernorm.weight", (s.hidden,)
        yield i, p + "self_attn.q_proj.weight", (s.heads * hd, s.hidden)
        yield i, p + "self_attn.k_proj.weight", (s.kv_heads * hd, s.hidden)
        yield i, p + "self_attn.v_proj.weight", (s.kv_heads * hd, s.hidden)
        yield i, p + "self_attn.o_proj.weight", (s.hidden, s.heads * hd)
        yield i, p + "post_attention_layernorm.weight", (s.hidden,)
        yield i, p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)
        yield i, p + "mlp.up_proj.weight", (s.intermediate, s.hidden)
        yield i, p + "mlp.down_proj.weight", (s.hidden, s.intermediate)
    yield None, "model.norm.weight", (s.hidden,)
    yield None, "lm_head.weight", (s.vocab, s.hidden)


def _tensor(name: str, shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """Norm weights near 1, everything else N(0, 0.02) (the Llama initializer), seeded per tensor."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (torch.randn(shape, generator=g, dtype=torch.bfloat16) * 0.02)


def _tokenizer(vocab: int, corpus: Path):
    """A byte-level BPE of `vocab` tokens trained on the corpus (<unk>, <s>, </s> = 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quant.calibration import read_text

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = read_text(corpus, max_chars=4_000_000)
    tk.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_hf_model(out: str | Path, s: Shape, corpus: Path, seed: int = 0, progress: bool = True) -> Path:
    """A complete Hugging Face directory (skipped when one of this shape and seed is there already)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    root = Path(out)
    stamp = {"shape": asdict(s), "seed": seed}
    if (root / DONE).is_file() and json.loads((root / DONE).read_text()) == stamp:
        return root
    root.mkdir(parents=True, exist_ok=True)
    _config(s).save_pretrained(root)
    _tokenizer(s.vocab, corpus).save_pretrained(root)
    shards: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
    n_files = s.layers + 1
    for index, (layer, name, shape) in enumerate(tensor_shapes(s)):
        k = s.layers if layer is None else layer  # embedding, norm and head share the last shard
        shards.setdefault(f"model-{k + 1:05d}-of-{n_files:05d}.safetensors", []).append((index, name, shape))
    weight_map = {}
    for file, items in tqdm(sorted(shards.items()), desc="write bf16 shards", unit="shard", disable=not progress):
        part = {name: _tensor(name, shape, seed, index) for index, name, shape in items}
        save_file(part, str(root / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in part}
    total = sum(int(np.prod(shape)) * 2 for _, _, shape in tensor_shapes(s))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (root / DONE).write_text(json.dumps(stamp))
    return root


_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = name.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's RoPE layout for q/k rows (convert_hf_to_gguf's permute; transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokenizer(writer, hf_dir: Path) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def write_gguf_q8_0(hf_dir: str | Path, out: str | Path, progress: bool = True) -> Path:
    """The HF directory's weights as GGUF Q8_0 (norms F32), header first, then tensor by tensor."""
    import gguf
    from tqdm.auto import tqdm

    from quant.sources import open_source

    path, src_dir = Path(out), Path(hf_dir)
    stamp = path.with_suffix(".done")
    if path.is_file() and stamp.is_file():
        return path
    source = open_source(str(src_dir))
    cfg = source.config()
    s = Shape(cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads,
              cfg.num_key_value_heads, cfg.vocab_size, cfg.max_position_embeddings)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edgeweave synthetic llama")
    w.add_context_length(s.max_positions)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(s.hidden // s.heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    _gguf_tokenizer(w, src_dir)
    items = list(tensor_shapes(s))
    for _, name, shape in items:
        if len(shape) == 1:
            w.add_tensor_info(_gguf_name(name), shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, q8)
            w.add_tensor_info(_gguf_name(name), byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, name, shape in tqdm(items, desc="write GGUF Q8_0", unit="tensor", disable=not progress):
        t = source.get(name).numpy()
        if name.endswith("q_proj.weight"):
            t = _permute(t, s.heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, s.kv_heads)
        w.write_tensor_data(t if len(shape) == 1 else gguf.quants.quantize(t, q8))
        source.release()
    w.close()
    stamp.write_text("ok")
    return path
