#!/usr/bin/env python3
"""Train moelab's bundled default model: a tiny MixtralForCausalLM on the multi-domain corpus.

Heavy tier (needs torch, transformers, sentencepiece: `scripts/setup.sh --dev`). CPU only, from a fixed
seed, in well under an hour on two cores. Usage:

    .venv/bin/python scripts/train_tiny_mixtral.py [--out models/tiny-mixtral] [--seed 0]
        [--corpus DIR] [--steps N] [--threads 2] [--expect OLD/model_card.json]

Steps:
 1. Corpus. With --corpus DIR it reads DIR/corpus.jsonl and DIR/heldout.jsonl (scripts/make_domain_corpus.py
    output). Without it, it reads the copy committed beside the bundled model
    (models/tiny-mixtral/corpus/train.jsonl.gz and heldout.jsonl), so a retrain on any machine sees the
    same bytes (the corpus is built from Debian package files, which differ between releases). The corpus
    is copied to OUT/corpus; the sha256 of both splits goes in the card. The committed corpus was made by
    `scripts/make_domain_corpus.py DIR --train-bytes 400000` (seed 0, Debian 12).
 2. Tokenizer: a sentencepiece BPE model trained on the training split only, with byte fallback (no
    text is ever <unk>), digits split (arithmetic), whitespace kept as is (code), identity normalization,
    and the Llama/Mixtral special ids (unk 0, bos 1, eos 2), so it loads wherever Mixtral's does.
 3. Model: MixtralForCausalLM, 8 experts, top-2, GQA, trained in FP32 with AdamW, warmup + cosine decay,
    the Switch load-balancing loss (transformers' router_aux_loss_coef) so that no expert starves, on
    random windows of the concatenated training documents (each document framed by BOS ... EOS).
 4. Evaluation on the held-out split, per domain: mean token loss, perplexity, bits per byte; the same
    for a unigram model fitted on the training tokens (add-one smoothing), the floor a model that
    ignores context reaches; and the expert load per domain and layer (first choice), which shows
    whether experts specialize.
 5. Output: OUT/config.json, OUT/model.safetensors (BF16, the form Mixtral is published in),
    OUT/tokenizer.model, OUT/README.md (model card), OUT/model_card.json (every figure of the card),
    OUT/training_log.csv (loss curve), OUT/loss_curve.png (when matplotlib is present). Each file is
    written to a temporary name, then renamed.

Determinism: torch.use_deterministic_algorithms, a fixed thread count and seeded generators make two
runs with the same arguments on the same machine produce the same losses; across CPUs, float rounding in
BLAS may differ in the last bits and the figures agree within noise. --expect FILE compares the new
figures with an older card and exits non-zero if a held-out loss differs by more than 0.02 nats.
Measured: a second run on the development machine wrote bit-identical model.safetensors,
tokenizer.model and training_log.csv.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The architecture. 8 experts, top-2 and GQA as in Mixtral-8x7B; everything else scaled down so that
# BF16 weights fit in ~9 MB and an epoch over the corpus takes about a minute on two cores.
ARCH = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)
VOCAB_SIZE = 4096
SEQ_LEN = 256


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "models", "tiny-mixtral"))
    p.add_argument("--corpus", help="folder with corpus.jsonl (or train.jsonl.gz) and heldout.jsonl "
                                    "(default: models/tiny-mixtral/corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16, help="sequences of %d tokens per step" % SEQ_LEN)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss", type=float, default=0.02, help="router_aux_loss_coef (Switch balance loss)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--expect", help="an older model_card.json whose figures this run must reproduce")
    p.add_argument("--evaluate-only", action="store_true",
                   help="only recompute the card's held-out figures from the checkpoint in OUT")
    return p.parse_args()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: str, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def read_jsonl(data: bytes):
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def load_corpus(args):
    """Returns (train_docs, heldout_docs, facts) and keeps a copy of the corpus in OUT/corpus.

    The corpus is --corpus DIR (corpus.jsonl or train.jsonl.gz, and heldout.jsonl), by default the copy
    committed beside the bundled model, so a retrain reads the same bytes on any machine."""
    src = os.path.abspath(args.corpus or os.path.join(REPO, "models", "tiny-mixtral", "corpus"))
    try:
        if os.path.exists(os.path.join(src, "corpus.jsonl")):
            with open(os.path.join(src, "corpus.jsonl"), "rb") as f:
                train = f.read()
        else:
            with gzip.open(os.path.join(src, "train.jsonl.gz"), "rb") as f:
                train = f.read()
        with open(os.path.join(src, "heldout.jsonl"), "rb") as f:
            heldout = f.read()
    except FileNotFoundError as e:
        sys.exit(f"train_tiny_mixtral: {e.filename}: not found; pass --corpus DIR "
                 "(made by scripts/make_domain_corpus.py DIR)")
    corpus_dir = os.path.abspath(os.path.join(args.out, "corpus"))
    if corpus_dir != src:
        os.makedirs(corpus_dir, exist_ok=True)
        # gzip with mtime 0, so the committed bytes do not change from run to run.
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
            gz.write(train)
        atomic_write(os.path.join(corpus_dir, "train.jsonl.gz"), buf.getvalue())
        atomic_write(os.path.join(corpus_dir, "heldout.jsonl"), heldout)
        for name in ("manifest.json", "README.md"):
            if os.path.exists(os.path.join(src, name)):
                with open(os.path.join(src, name), "rb") as f:
                    atomic_write(os.path.join(corpus_dir, name), f.read())
    facts = {"train_sha256": sha256(train), "heldout_sha256": sha256(heldout),
             "train_bytes": len(train), "heldout_bytes": len(heldout)}
    return read_jsonl(train), read_jsonl(heldout), facts


def train_tokenizer(train_docs, out_path, seed):
    import sentencepiece as spm

    # sentencepiece reads sentences one per line; documents are split at newlines (the newline itself
    # becomes the byte-fallback piece <0x0A>, as in Llama's and Mixtral's tokenizers).
    lines = [line for d in train_docs for line in d["text"].split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, seed_sentencepiece_size=1000000,
        minloglevel=2)
    atomic_write(out_path, model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encode_docs(sp, docs):
    return [[sp.bos_id()] + sp.encode(d["text"]) + [sp.eos_id()] for d in docs]


def unigram_losses(train_ids, heldout_ids_by_domain, vocab):
    """Mean held-out token loss (nats) of an add-one-smoothed unigram model fitted on the training tokens.

    BOS is never predicted (the models below do not predict it either)."""
    counts = Counter(t for doc in train_ids for t in doc[1:])
    total = sum(counts.values()) + vocab
    out = {}
    for dom, docs in heldout_ids_by_domain.items():
        nll = [-math.log((counts.get(t, 0) + 1) / total) for doc in docs for t in doc[1:]]
        out[dom] = sum(nll) / len(nll)
    return out


def evaluate(model, sp, train_ids, heldout_docs, heldout_ids):
    """The card's held-out figures: per domain, loss over every held-out token in windows of SEQ_LEN
    (each window starts a fresh context; its first token is not predicted), perplexity, bits per byte,
    the unigram baseline, and the first-choice expert load per layer."""
    import numpy as np
    import torch

    config = model.config
    by_domain, bytes_by_domain = defaultdict(list), Counter()
    for d, ids in zip(heldout_docs, heldout_ids):
        by_domain[d["domain"]].append(ids)
        bytes_by_domain[d["domain"]] += len(d["text"].encode("utf-8"))
    domains = sorted(by_domain)
    model.eval()
    loss, load = {}, {}
    with torch.no_grad():
        for dom in domains:
            tot, n = 0.0, 0
            counts = np.zeros((config.num_hidden_layers, config.num_local_experts), dtype=np.int64)
            for ids in by_domain[dom]:
                for s in range(0, len(ids) - 1, SEQ_LEN):
                    w = torch.tensor([ids[s: s + SEQ_LEN + 1]])
                    out = model(input_ids=w[:, :-1], output_router_logits=True)
                    lp = torch.log_softmax(out.logits.float(), -1)
                    tot += -lp[0].gather(-1, w[0, 1:, None]).sum().item()
                    n += w.shape[1] - 1
                    for layer, rl in enumerate(out.router_logits):
                        counts[layer] += np.bincount(rl.argmax(-1).numpy(), minlength=config.num_local_experts)
            loss[dom] = tot / n
            load[dom] = (counts / counts.sum(1, keepdims=True)).round(4).tolist()
    uni = unigram_losses(train_ids, by_domain, config.vocab_size)
    tokens = {d: sum(len(x) - 1 for x in by_domain[d]) for d in domains}
    total = sum(tokens.values())
    overall = sum(loss[d] * tokens[d] for d in domains) / total
    overall_uni = sum(uni[d] * tokens[d] for d in domains) / total
    return {
        "heldout": {d: {"tokens": tokens[d], "bytes": bytes_by_domain[d], "loss": round(loss[d], 4),
                        "perplexity": round(math.exp(loss[d]), 2),
                        "bits_per_byte": round(loss[d] * tokens[d] / bytes_by_domain[d] / math.log(2), 4),
                        "unigram_loss": round(uni[d], 4), "unigram_perplexity": round(math.exp(uni[d]), 2)}
                    for d in domains},
        "heldout_overall": {"loss": round(overall, 4), "perplexity": round(math.exp(overall), 2),
                            "unigram_loss": round(overall_uni, 4), "unigram_perplexity": round(math.exp(overall_uni), 2)},
        "expert_load_first_choice": load,
    }


def evaluate_only(args):
    """Recomputes the card's held-out figures from the saved checkpoint (BF16 weights) and rewrites the card."""
    import sentencepiece as spm
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(args.threads)
    train_docs, heldout_docs, _ = load_corpus(args)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.out, "tokenizer.model"))
    model = MixtralForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16).to(torch.float32)
    with open(os.path.join(args.out, "model_card.json")) as f:
        card = json.load(f)
    card.update(evaluate(model, sp, encode_docs(sp, train_docs), heldout_docs, encode_docs(sp, heldout_docs)))
    with open(os.path.join(args.out, "training_log.csv")) as f:
        rows = [{k: (float(v) if k != "step" else int(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    atomic_write(os.path.join(args.out, "model_card.json"), (json.dumps(card, indent=1) + "\n").encode())
    atomic_write(os.path.join(args.out, "README.md"), model_card_markdown(card, rows, sorted(card["heldout"])).encode())
    print(json.dumps(card["heldout_overall"]))


def main():
    args = parse_args()
    if args.evaluate_only:
        return evaluate_only(args)
    import numpy as np
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()

    train_docs, heldout_docs, corpus_facts = load_corpus(args)
    sp = train_tokenizer(train_docs, os.path.join(args.out, "tokenizer.model"), args.seed)
    train_ids = encode_docs(sp, train_docs)
    heldout_ids = encode_docs(sp, heldout_docs)
    stream = np.fromiter((t for doc in train_ids for t in doc), dtype=np.int64)
    print(f"corpus: {len(train_docs)} train docs, {len(stream)} tokens "
          f"({corpus_facts['train_bytes'] / len(stream):.2f} bytes/token); {len(heldout_docs)} held-out docs",
          flush=True)

    config = MixtralConfig(vocab_size=sp.get_piece_size(), bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
                           tie_word_embeddings=False, sliding_window=None, router_aux_loss_coef=args.aux_loss,
                           output_router_logits=True, attention_dropout=0.0, router_jitter_noise=0.0,
                           initializer_range=0.02, **ARCH)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    # A fixed held-out probe set for the loss curve: the first window of every held-out document.
    probe = [ids[: SEQ_LEN + 1] for ids in heldout_ids if len(ids) > 16]

    def heldout_loss_quick():
        model.eval()
        with torch.no_grad():
            tot, n = 0.0, 0
            for ids in probe:
                x = torch.tensor([ids])
                out = model(input_ids=x[:, :-1], labels=None, output_router_logits=False)
                lp = torch.log_softmax(out.logits.float(), -1)
                nll = -lp[0].gather(-1, x[0, 1:, None])[:, 0]
                tot += nll.sum().item()
                n += nll.numel()
        model.train()
        return tot / n

    gen = torch.Generator().manual_seed(args.seed)
    stream_t = torch.from_numpy(stream)
    log_rows = []
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(stream_t) - SEQ_LEN - 1, (args.batch,), generator=gen)
        batch = torch.stack([stream_t[s: s + SEQ_LEN + 1] for s in starts.tolist()])
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        # The LM loss computed here (not by passing labels) so the shift is explicit: position i predicts i+1.
        lm_loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, config.vocab_size),
                                                    batch[:, 1:].reshape(-1))
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
        loss = lm_loss + args.aux_loss * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = {"step": step + 1, "lr": lr_at(step), "train_loss": lm_loss.item(), "aux_loss": float(aux)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row["heldout_loss"] = heldout_loss_quick()
            elapsed = time.time() - t0
            print(f"step {step + 1}/{args.steps}  train {lm_loss.item():.3f}  held-out {row['heldout_loss']:.3f}  "
                  f"aux {float(aux):.3f}  {(step + 1) * args.batch * SEQ_LEN / elapsed:.0f} tok/s  "
                  f"eta {elapsed / (step + 1) * (args.steps - step - 1) / 60:.1f} min", flush=True)
        log_rows.append(row)
    train_seconds = time.time() - t0

    # Save: BF16 weights (the published dtype of Mixtral), config without training-only switches. The
    # card's figures are computed on exactly these weights (BF16, widened back to FP32), so any
    # implementation reading the checkpoint can check them (tests/test_bundled_model.cpp does).
    model.config.output_router_logits = False
    model.config.use_cache = True
    model = model.to(torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("config.json", "model.safetensors"):
            os.replace(os.path.join(tmp, name), os.path.join(args.out, name))
    # Evaluated as loaded from disk: converting the live model to BF16 and back would also round the
    # rotary inverse-frequency buffer, which a loaded checkpoint recomputes in FP32 (seen as 1e-4 nats).
    model = MixtralForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16).to(torch.float32)
    figures = evaluate(model, sp, train_ids, heldout_docs, heldout_ids)

    card = {
        "seed": args.seed, "steps": args.steps, "batch_sequences": args.batch, "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * args.batch * SEQ_LEN, "lr": args.lr, "aux_loss_coef": args.aux_loss,
        "threads": args.threads, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1), "parameters": n_params,
        "architecture": ARCH, "vocab_size": config.vocab_size, "corpus": corpus_facts,
        "train_tokens": int(len(stream)), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        **figures,
        "final_train_loss": round(sum(r["train_loss"] for r in log_rows[-50:]) / len(log_rows[-50:]), 4),
    }
    atomic_write(os.path.join(args.out, "model_card.json"), (json.dumps(card, indent=1) + "\n").encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "lr", "train_loss", "aux_loss", "heldout_loss"])
    w.writeheader()
    for r in log_rows:
        w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(os.path.join(args.out, "training_log.csv"), buf.getvalue().encode())
    plot_loss(args.out, log_rows)
    atomic_write(os.path.join(args.out, "README.md"), model_card_markdown(card, log_rows, sorted(card["heldout"])).encode())
    print(f"wrote {args.out} in {card['total_seconds'] / 60:.1f} min; held-out loss "
          f"{card['heldout_overall']['loss']:.3f} (unigram {card['heldout_overall']['unigram_loss']:.3f})", flush=True)

    if args.expect:
        with open(args.expect) as f:
            old = json.load(f)
        worst = max(abs(old["heldout"][d]["loss"] - card["heldout"][d]["loss"]) for d in card["heldout"])
        print(f"reproduction: largest per-domain held-out loss difference vs {args.expect}: {worst:.4f} nats")
        if worst > 0.02:
            sys.exit(1)


def plot_loss(out, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=0.6, alpha=0.6, label="train (batch)")
    ev = [r for r in rows if "heldout_loss" in r]
    ax.plot([r["step"] for r in ev], [r["heldout_loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    atomic_write(os.path.join(out, "loss_curve.png"), buf.getvalue())


def model_card_markdown(card, rows, domains):
    a = card["architecture"]
    lines = [
        "# tiny-mixtral: moelab's bundled default model",
        "",
        "A small `MixtralForCausalLM` (8 experts, top-2 routing, grouped-query attention), trained from scratch",
        "by `scripts/train_tiny_mixtral.py` on the CPU, so that moelab's first command runs the whole toolkit",
        "on a real, trained sparse-MoE model. It is a toy for tools, not a language model to use: it has",
        f"seen {card['tokens_seen'] / 1e6:.1f}M tokens of one small corpus.",
        "",
        "## Reproduce",
        "",
        "```sh",
        "scripts/setup.sh --dev",
        f".venv/bin/python scripts/train_tiny_mixtral.py --seed {card['seed']} --steps {card['steps']} "
        f"--threads {card['threads']} --expect models/tiny-mixtral/model_card.json --out /tmp/retrained",
        "```",
        "",
        f"Took {card['total_seconds'] / 60:.1f} minutes on 2 cores (torch {card['torch']}, transformers "
        f"{card['transformers']}); `--expect` fails if a per-domain held-out loss moves by more than 0.02 nats.",
        "",
        "## Corpus",
        "",
        "The multi-domain corpus of `scripts/make_domain_corpus.py` (seed 0, `--train-bytes 400000`; Debian package files plus",
        "synthetic arithmetic; see `corpus/README.md` and `corpus/manifest.json` for every source file and",
        "its package). Copied here (`corpus/train.jsonl.gz`, `corpus/heldout.jsonl`) so that retraining",
        "reads the same bytes on any machine; the held-out split shares no source file with training.",
        f"Training split: {card['corpus']['train_bytes']} bytes of JSONL, {card['train_tokens']} tokens; "
        f"sha256 {card['corpus']['train_sha256'][:16]}...; held-out sha256 "
        f"{card['corpus']['heldout_sha256'][:16]}...",
        "",
        "## Tokenizer",
        "",
        f"sentencepiece BPE, {card['vocab_size']} pieces, trained on the training split only: byte fallback",
        "(every byte has a piece, nothing is `<unk>`), digits split one per piece, identity normalization,",
        "whitespace kept (code indentation survives), dummy prefix; ids unk 0, bos 1, eos 2 as in Mixtral's.",
        "",
        "## Model and training",
        "",
        f"| | |", "|---|---|",
        f"| parameters | {card['parameters'] / 1e6:.2f}M (stored in BF16) |",
        f"| layers, hidden, expert intermediate | {a['num_hidden_layers']}, {a['hidden_size']}, "
        f"{a['intermediate_size']} |",
        f"| experts, top-k | {a['num_local_experts']}, {a['num_experts_per_tok']} |",
        f"| attention heads, KV heads | {a['num_attention_heads']}, {a['num_key_value_heads']} |",
        f"| RoPE theta, max positions | {a['rope_theta']:g}, {a['max_position_embeddings']} |",
        f"| steps x batch x sequence | {card['steps']} x {card['batch_sequences']} x {card['seq_len']} "
        f"({card['tokens_seen'] / 1e6:.1f}M tokens) |",
        f"| optimizer | AdamW (0.9, 0.95), weight decay 0.1, peak lr {card['lr']}, 5% warmup, cosine to 10% |",
        f"| router balance loss | Switch auxiliary loss x {card['aux_loss_coef']} |",
        f"| seed, threads | {card['seed']}, {card['threads']} |",
        "",
        "Loss curve: `training_log.csv` (every step; held-out on the first window of every held-out document",
        "every few steps), `loss_curve.png`.",
        "",
        "| step | train loss | held-out loss |", "|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['train_loss']:.3f} | {r['heldout_loss']:.3f} |" for r in rows if "heldout_loss" in r]
    lines += [
        "",
        "## Held-out results, per domain",
        "",
        "Loss in nats per token over every held-out token (windows of 256); the unigram model is fitted on",
        "the training tokens (add-one smoothing): what a model that ignores context reaches.",
        "",
        "| domain | tokens | loss | perplexity | bits/byte | unigram loss | unigram perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in domains:
        h = card["heldout"][d]
        lines.append(f"| {d} | {h['tokens']} | {h['loss']:.3f} | {h['perplexity']:.1f} | {h['bits_per_byte']:.3f} | "
                     f"{h['unigram_loss']:.3f} | {h['unigram_perplexity']:.1f} |")
    o = card["heldout_overall"]
    lines += [f"| all | {sum(card['heldout'][d]['tokens'] for d in domains)} | {o['loss']:.3f} | "
              f"{o['perplexity']:.1f} | | {o['unigram_loss']:.3f} | {o['unigram_perplexity']:.1f} |", ""]
    lines += ["## Expert load by domain (first choice, last layer)", "",
              "Share of held-out tokens whose first-choice expert is each one; 0.125 each would be uniform.",
              "The balance loss evens out the top-2 load over the whole corpus (transformers' auxiliary loss",
              "stays near its balanced value 2), not the first choices, and not within a domain: experts that",
              "are rarely first choice serve as second choices, and the shares move with the domain.",
              "`moelab demo` and `moelab stats --by-domain` give every layer and both choices.", "",
              "| domain | " + " | ".join(f"e{e}" for e in range(a["num_local_experts"])) + " |",
              "|---|" + "---|" * a["num_local_experts"]]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(f"{v:.3f}" for v in card["expert_load_first_choice"][d][-1]) + " |")
    lines += ["", "## License", "",
              "The weights and tokenizer are moelab's (same license as the repository). The corpus copy keeps",
              "each source file's own license (listed per file in `corpus/manifest.json`; all are free",
              "software or public-domain texts shipped by Debian).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
