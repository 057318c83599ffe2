"""Build a tiny random-weight Whisper for faster-whisper, fully offline (no weights can be downloaded).

The tokenizer is Whisper's real multilingual one, rebuilt from the ``openai-whisper`` source
package's assets (installed with --no-deps only for them); the model has Whisper's architecture at
toy size with random weights, converted by CTranslate2 like any real checkpoint. It loads and
decodes through exactly the code path a real model takes; its text is garbage.
"""
from __future__ import annotations

import ast
import base64
import importlib.util
import os
import shutil
from pathlib import Path


def _tokenizer(out: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    wdir = Path(importlib.util.find_spec("whisper").origin).parent
    ranks: dict[bytes, int] = {}
    for line in (wdir / "assets" / "multilingual.tiktoken").read_text().splitlines():
        if line.strip():
            tok, r = line.split()
            ranks[base64.b64decode(tok)] = int(r)
    mod = ast.parse((wdir / "tokenizer.py").read_text())
    languages = next(ast.literal_eval(n.value) for n in mod.body
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "LANGUAGES")

    # GPT-2's byte-to-unicode table, which byte-level BPE vocabularies are written in.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    b2u = dict(zip(bs, map(chr, cs)))

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    def split(token: bytes, max_rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best[1]):
                    best = (i, r)
            if best is None or best[1] >= max_rank:
                return parts
            i = best[0]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]

    merges = []
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) > 1:
            a, b = split(t, r)
            merges.append((enc(a), enc(b)))
    tk = Tokenizer(models.BPE(vocab={enc(t): r for t, r in ranks.items()}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    langs = list(languages)[:99]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{lang}|>" for lang in langs],
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nospeech|>", "<|notimestamps|>", *[f"<|{i * 0.02:.2f}|>" for i in range(1501)]]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tk.get_vocab_size() == 51865
    tk.save(str(out / "tokenizer.json"))
    return tk, langs


def build(target: Path) -> Path:
    """Build (once) and return a CTranslate2 Whisper directory at ``target``."""
    if (target / "model.bin").exists():
        return target
    import ctranslate2
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperForConditionalGeneration

    hf = target.with_name(target.name + ".hf")
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir(parents=True)
    tk, langs = _tokenizer(hf)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(hf)
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                        decoder_ffn_dim=256, max_source_positions=1500, max_target_positions=448,
                        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, suppress_tokens=[],
        begin_suppress_tokens=[220, 50257], no_timestamps_token_id=tk.token_to_id("<|notimestamps|>"),
        lang_to_id={f"<|{lang}|>": tk.token_to_id(f"<|{lang}|>") for lang in langs},
    )
    model.save_pretrained(hf)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ctranslate2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(str(tmp), quantization="int8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: parallel test sessions never see half a model
    shutil.rmtree(hf, ignore_errors=True)
    return target
