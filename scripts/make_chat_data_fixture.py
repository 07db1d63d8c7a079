#!/usr/bin/env python3
"""Expected token ids and loss masks for conversational training data (tests/fixtures/train/chat_data.json).

Run from the repository root (CPU, no network, a few seconds):

    .bench-cache/venv/bin/python scripts/make_chat_data_fixture.py

Needs transformers (4.57.x) with sentencepiece and jinja2, as in the benchmark virtual environment.

What and why
------------
`moelab finetune` reads trl's conversational dataset kinds ({"messages": [...]} and {"prompt": [...],
"completion": [...]}) and tokenizes them with Mixtral-8x7B-Instruct-v0.1's chat template (train/data.hpp).
The oracle here is transformers itself: the template below is the Jinja text of that checkpoint's
tokenizer_config.json, rendered by transformers' apply_chat_template and tokenized by it with the bundled
model's tokenizer.model. The tokenizer is transformers' LlamaTokenizer with legacy=False, which is how
Mixtral-8x7B-Instruct-v0.1's tokenizer behaves since the update that made transformers agree 1-to-1 with
mistral_common (Mistral's reference: "<s>", "▁[", "INST", "]", "▁user" ..., one word-boundary space after BOS
and EOS, the template's leading space; legacy=True would add a second one). The folder has only
tokenizer.model, so a temporary tokenizer_config.json selects it, as scripts/eval_parity.py does. Two more
oracles are checked and recorded: the fast tokenizer converted from it (the same ids, asserted), and
mistral_common's V1 rule written out with plain sentencepiece (BOS + encode("[INST] " + user + " [/INST]") +
encode(answer) + EOS ..., each encode with sentencepiece's prefix space), asserted equal wherever no message is
empty ("mistral_common_v1_agrees" per case).

legacy=False needs sentencepiece's protobuf module; where its generated module does not import (a protobuf
older than 5.26), transformers' own copy is used (transformers.utils.sentencepiece_model_pb2_new).

The masks follow trl's SFTTrainer (trl/trainer/sft_trainer.py, tokenize_fn, 2025-2026):
  - "messages": input_ids = apply_chat_template(messages, tokenize=True); no mask (assistant_only_loss is off by
    default, and Mixtral's template has no {% generation %} markers for it), so every token is a label.
  - conversational prompt-completion: prompt_ids = apply_chat_template(prompt, add_generation_prompt=True),
    input_ids = apply_chat_template(prompt + completion); completion_mask = [0] * len(prompt_ids) + [1] * rest,
    applied by default (completion_only_loss defaults to True for prompt-completion data).
No EOS is appended to conversational data (the template writes one after each assistant turn).
"""
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "models/tiny-mixtral/tokenizer.model")
OUT = os.path.join(ROOT, "tests/fixtures/train/chat_data.json")

# mistralai/Mixtral-8x7B-Instruct-v0.1, tokenizer_config.json "chat_template" (the revision with the optional
# leading system message).
MIXTRAL_INSTRUCT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


# Each case is one JSONL line as a user would write it.
LINES = [
    {"messages": [U("What is 2+2?"), A("4")]},
    {"messages": [U("Name a colour."), A("Blue."), U("Another one?"), A("Green, of course.")]},
    {"messages": [S("You are terse."), U("Capital of France?"), A("Paris.")]},
    {"messages": [U("Hello"), A("Hi!"), U("Bye")]},  # ends with the user: the template allows it
    {"messages": [U("  leading spaces\nand a newline"), A("\u00e9t\u00e9 \u2014 caf\u00e9 \U0001f600\ttab")]},
    {"messages": [U("brackets [INST] inside [/INST] text"), A("<b>tags</b> and <s-like> text")]},
    {"messages": [U(""), A("")]},  # empty contents: the template renders them
    {"messages": [S("System only, then a user."), U("x")]},
    {"prompt": [U("What is 3+3?")], "completion": [A("6")]},
    {"prompt": [S("Answer in French."), U("Cat?")], "completion": [A("Chat.")]},
    {"prompt": [U("One"), A("Two"), U("Three?")], "completion": [A("Four.")]},
    {"prompt": [U("Say two things.")], "completion": [A("First thing, then the second.")]},
    {"prompt": [S("Only the system message in the prompt.")], "completion": [U("q"), A("a")]},
]


def use_transformers_protobuf_copy():
    """LlamaTokenizer(legacy=False) and the slow-to-fast converter read the model proto through
    import_protobuf(), which prefers sentencepiece's generated module; that one needs protobuf >= 5.26."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
        return "sentencepiece's"
    except ImportError:
        import transformers.convert_slow_tokenizer as csl
        import transformers.models.llama.tokenization_llama as tl
        from transformers.utils import sentencepiece_model_pb2_new as pb2
        csl.import_protobuf = lambda *a, **k: pb2
        tl.import_protobuf = lambda *a, **k: pb2
        return "transformers.utils.sentencepiece_model_pb2_new"


def mistral_common_v1(sp, messages):
    """Mistral's V1 instruct tokenization (mistralai/cookbook, concept-deep-dive/tokenization): BOS, then per
    user message encode("[INST] " + content + " [/INST]") (a leading system message joined to the first user
    message with a blank line), per assistant message encode(content) + EOS; encode adds the prefix space."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    ids = [sp.bos_id()]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            content = (system + "\n\n" + m["content"]) if (i == 0 and system is not None) else m["content"]
            ids += sp.encode("[INST] " + content + " [/INST]")
        else:
            ids += sp.encode(m["content"]) + [sp.eos_id()]
    return ids


def make_tokenizer_dir(tmp):
    d = os.path.join(tmp, "tok")
    os.makedirs(d)
    shutil.copy(TOKENIZER, os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
                   "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "clean_up_tokenization_spaces": False, "chat_template": MIXTRAL_INSTRUCT_TEMPLATE}, f)
    return d


def ids_of(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def main():
    import sentencepiece as spm
    import transformers
    from transformers import AutoTokenizer, LlamaTokenizerFast

    proto = use_transformers_protobuf_copy()
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        d = make_tokenizer_dir(tmp)
        slow = AutoTokenizer.from_pretrained(d, use_fast=False)
        assert type(slow).__name__ == "LlamaTokenizer" and slow.legacy is False, type(slow).__name__
        fast = LlamaTokenizerFast.from_pretrained(d, from_slow=True, legacy=False)
        cases = []
        for line in LINES:
            messages = line["messages"] if "messages" in line else line["prompt"] + line["completion"]
            ids = ids_of(slow, messages)
            assert ids == ids_of(fast, messages), ("fast and slow disagree", line)
            case = {"line": line, "input_ids": ids, "completion_mask": None,
                    "rendered": slow.apply_chat_template(messages, tokenize=False),
                    "mistral_common_v1_agrees": ids == mistral_common_v1(sp, messages)}
            if all(m["content"] for m in messages):
                assert case["mistral_common_v1_agrees"], ("differs from mistral_common's rule", line)
            if "prompt" in line:
                prompt_ids = ids_of(slow, line["prompt"], add_generation_prompt=True)
                assert prompt_ids == ids_of(fast, line["prompt"], add_generation_prompt=True), line
                if ids[:len(prompt_ids)] != prompt_ids:
                    print("warning: the prompt's ids are not a prefix of the whole (trl warns too):", line)
                case["completion_mask"] = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
            cases.append(case)
        # The template's own errors, for the record (the C++ test has its own error cases).
        errors = {}
        for name, msgs in {"non_alternating": [U("a"), U("b")], "tool_role": [U("a"), {"role": "tool", "content": "x"}],
                           "late_system": [U("a"), A("b"), S("c")]}.items():
            try:
                slow.apply_chat_template(msgs, tokenize=False)
                errors[name] = None
            except Exception as e:  # jinja2's TemplateError
                errors[name] = str(e)

    doc = {
        "generated_by": "scripts/make_chat_data_fixture.py (transformers apply_chat_template, LlamaTokenizer "
                        "legacy=False on models/tiny-mixtral/tokenizer.model; masks as trl's SFTTrainer tokenize_fn)",
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "tokenizer": "LlamaTokenizer legacy=False; LlamaTokenizerFast converted from it gives the same ids",
        "protobuf_module": proto,
        "chat_template": MIXTRAL_INSTRUCT_TEMPLATE,
        "template_errors": errors,
        "cases": cases,
    }
    tmp_out = OUT + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp_out, OUT)
    print(f"wrote {len(cases)} cases to {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
