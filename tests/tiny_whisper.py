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


def _tokenizer(out: Path, n_languages: int = 99):
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
    langs = list(languages)[:n_languages]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{lang}|>" for lang in langs],
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nospeech|>", "<|notimestamps|>", *[f"<|{i * 0.02:.2f}|>" for i in range(1501)]]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tk.get_vocab_size() == 51766 + n_languages
    tk.save(str(out / "tokenizer.json"))
    return tk, langs


def build(target: Path) -> Path:
    """Build (once) and return a CTranslate2 Whisper directory at ``target``."""
    return build_random(target)


# Real architectures, for benchmarks: random weights, real sizes (what a GPU's time depends on).
ARCHS = {
    "tiny-test": dict(num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2, attention_heads=4,
                      ffn_dim=256, vocab_size=51865),
    "tiny": dict(num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4, attention_heads=6,
                 ffn_dim=1536, vocab_size=51865),
    "base": dict(num_mel_bins=80, d_model=512, encoder_layers=6, decoder_layers=6, attention_heads=8,
                 ffn_dim=2048, vocab_size=51865),
    "small": dict(num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12, attention_heads=12,
                  ffn_dim=3072, vocab_size=51865),
    "large-v3-turbo": dict(num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=4,
                           attention_heads=20, ffn_dim=5120, vocab_size=51866),
}


def build_random(target: Path, *, num_mel_bins: int = 80, d_model: int = 64, encoder_layers: int = 2,
                 decoder_layers: int = 2, attention_heads: int = 4, ffn_dim: int = 256, vocab_size: int = 51865,
                 quantization: str = "int8") -> Path:
    """Build (once) a random-weight Whisper of these dimensions at ``target`` (CTranslate2 format).

    The defaults are the test suite's toy model. ``vocab_size`` 51866 is the large-v3 tokenizer
    (100 languages, with Cantonese); 128 mel bins are written to ``preprocessor_config.json`` so
    faster-whisper computes the right features.
    """
    if (target / "model.bin").exists():
        return target
    import json

    import ctranslate2
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperForConditionalGeneration

    hf = target.with_name(target.name + ".hf")
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir(parents=True)
    tk, langs = _tokenizer(hf, n_languages=vocab_size - 51766)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(hf)
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=vocab_size, num_mel_bins=num_mel_bins, d_model=d_model,
                        encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                        encoder_attention_heads=attention_heads, decoder_attention_heads=attention_heads,
                        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, max_source_positions=1500,
                        max_target_positions=448, decoder_start_token_id=50258, eos_token_id=50257,
                        pad_token_id=50257, bos_token_id=50257)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, suppress_tokens=[],
        begin_suppress_tokens=[220, 50257], no_timestamps_token_id=tk.token_to_id("<|notimestamps|>"),
        lang_to_id={f"<|{lang}|>": tk.token_to_id(f"<|{lang}|>") for lang in langs},
    )
    model.save_pretrained(hf)
    copy = ["tokenizer.json"]
    if num_mel_bins != 80:
        (hf / "preprocessor_config.json").write_text(json.dumps({
            "feature_size": num_mel_bins, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30,
            "n_fft": 400}))
        copy.append("preprocessor_config.json")
    del model
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ctranslate2.converters.TransformersConverter(str(hf), copy_files=copy).convert(str(tmp), quantization=quantization)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: parallel test sessions never see half a model
    shutil.rmtree(hf, ignore_errors=True)
    return target
