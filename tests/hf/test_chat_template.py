"""Chat templates: the same token ids as transformers' apply_chat_template, rendered only in the sandbox."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from nanodecoder.data import DataError  # noqa: E402
from nanodecoder.data.chat import ChatTemplate, read_model_chat  # noqa: E402
from nanodecoder.data.hf_tokenizer import HFTokenizer  # noqa: E402
from nanodecoder.finetune.records import Instruction  # noqa: E402
from nanodecoder.finetune.spec import TemplateSpec  # noqa: E402
from nanodecoder.finetune.template import ChatPrompt  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "data"))
from test_gpt2_offline import train_bpe  # noqa: E402

# ChatML as Qwen2 writes it: a default system message, a raise_exception guard, tojson, loop controls.
CHATML = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system = 'You are a helpful assistant.' %}{% endif %}"
    "{{ bos_token }}<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{% for message in loop_messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles') }}"
    "{% endif %}"
    "{% if message['content'] == 'skip me' %}{% continue %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief. Ünïcödé 🎉"}, {"role": "user", "content": "  Say hi  "},
     {"role": "assistant", "content": "Hi! It's 12:30."}, {"role": "user", "content": "skip me"},
     {"role": "user", "content": "And\n\n  numbers 12345?"}],
]


def hf_chat_dir(folder, template=CHATML):
    """A model folder's tokenizer: a byte-level BPE with ChatML special tokens, saved by transformers."""
    bpe = train_bpe(folder / "bpe")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                              eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    hf.chat_template = template
    hf.save_pretrained(folder)
    return hf


def ids_of(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture
def chat_dir(tmp_path):
    d = tmp_path / "model"
    return d, hf_chat_dir(d)


def test_same_ids_as_apply_chat_template(chat_dir):
    d, hf = chat_dir
    assert (d / "chat_template.jinja").is_file()
    chat = read_model_chat(d)
    assert chat.tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    tok = HFTokenizer.from_file(d / "tokenizer.json")
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = ids_of(hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True))
            text = chat.render(messages, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.encode_special(text) == want
    assert tok.encode_special("<|im_start|>")[0] == hf.convert_tokens_to_ids("<|im_start|>")


def test_chat_prompt_masks_all_but_the_answer(chat_dir):
    d, hf = chat_dir
    tok = HFTokenizer.from_file(d / "tokenizer.json")
    tok.chat = read_model_chat(d)
    prompt = ChatPrompt(tok)
    rec = Instruction("Add the numbers.", "2 3", "5")
    user = [{"role": "user", "content": "Add the numbers.\n\n2 3"}]
    want_prompt = ids_of(hf.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
    want_full = ids_of(hf.apply_chat_template(user + [{"role": "assistant", "content": "5"}], tokenize=True))
    assert prompt.prompt_ids("Add the numbers.", "2 3") == want_prompt
    ids, n_prompt, cut = prompt.encode(rec, 1000)
    assert ids == want_full and n_prompt == len(want_prompt) and not cut
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in prompt.stop_ids
    answer_ids = ids[n_prompt:]
    assert prompt.response(answer_ids) == ("5", True)
    assert prompt.encode(rec, n_prompt) is None                   # no room for an answer token


def test_instruction_tuning_with_chat_true_learns_the_answer_only(chat_dir, tmp_path):
    from nanodecoder.config.declare import build
    from nanodecoder.finetune.instruction import InstructionTuning
    from nanodecoder.finetune.spec import InstructionSpec
    d, hf = chat_dir
    tok = HFTokenizer.from_file(d / "tokenizer.json")
    tok.chat = read_model_chat(d)
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": "Say yes.", "output": "yes"},
                                {"instruction": "Add", "input": "2 3", "output": "5"},
                                {"instruction": "Say no.", "output": "no"}]))
    spec = build(InstructionSpec, {"from": "src", "data": str(data), "val_fraction": 0.3,
                                   "template": {"chat": True}})
    task = InstructionTuning(spec, tokenizer=tok, base_dir=tmp_path, context_length=128)
    task.load()
    (tokens, n_prompt), = task.val_units[0]
    x, y = task.collate([[(tokens, n_prompt)]])
    learned = [int(t) for t in y[0] if t >= 0]
    assert learned == tokens[n_prompt:] and tok.decode(learned).endswith("<|im_end|>\n")
    assert "chat template's end of turn" in task.describe()


def test_chat_true_takes_no_text_template_keys():
    from nanodecoder.config.declare import build
    spec = build(TemplateSpec, {"chat": True})
    assert spec.chat and not list(spec.check())
    bad = build(TemplateSpec, {"chat": True, "end": "###"})
    assert [k for k, _ in bad.check()] == [("end",)]


def test_a_tokenizer_without_chat_template_is_a_clear_error(chat_dir):
    d, _ = chat_dir
    with pytest.raises(DataError, match="has no chat template"):
        ChatPrompt(HFTokenizer.from_file(d / "tokenizer.json"))


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox forbids"),
    ("{{ cycler.__init__.__globals__.os.system('echo pwned') }}", "sandbox forbids"),
    ("{{ messages.__class__ }}", "sandbox forbids"),
    ("{{ messages.append(1) }}", "sandbox forbids"),          # the immutable sandbox: no mutating calls
    ("{{ messages[0].update({'role': 'x'}) }}", "sandbox forbids"),
    ("{{ '{0.__class__}'.format(1) }}", "sandbox forbids"),    # str.format goes through the sandbox too
    ("{% set x = namespace() %}{{ x.__init__.__globals__ }}", "has no attribute '__init__'"),
])
def test_templates_reaching_python_internals_are_refused(template, message):
    with pytest.raises(DataError, match=message) as e:
        ChatTemplate(template, origin="evil.jinja").render([{"role": "user", "content": "hi"}])
    assert str(e.value).startswith("evil.jinja: ") and "\n" not in str(e.value)


def test_raise_exception_and_syntax_errors_are_one_line():
    chat = ChatTemplate(CHATML, {"bos_token": ""}, origin="m/chat_template.jinja")
    with pytest.raises(DataError, match="chat template raised: Only user and assistant roles") as e:
        chat.render([{"role": "tool", "content": "x"}])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"bad.jinja line 2: not a valid Jinja template"):
        ChatTemplate("ok\n{% for %}", origin="bad.jinja").render([])


def test_where_the_template_is_read_from(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert read_model_chat(d) is None
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        "eos_token": {"content": "</s>", "special": True}}))
    assert read_model_chat(d) == ChatTemplate("D", {"eos_token": "</s>"}, str(d / "tokenizer_config.json"))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert read_model_chat(d).template == "J"
    (d / "chat_template.jinja").write_text("K")
    assert read_model_chat(d).template == "K"


def test_without_jinja2_the_error_says_how_to_install():
    code = ("import sys; sys.modules['jinja2'] = None\n"
            "from nanodecoder.data.chat import ChatTemplate\n"
            "from nanodecoder.data import DataError\n"
            "try:\n    ChatTemplate('x').render([])\nexcept DataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "jinja2" in out and "pip install '.[hf]'" in out


def test_imported_model_answers_with_its_chat_template(tmp_path, capsys):
    from nanodecoder.cli.answer import main as answer_main
    from nanodecoder.cli.sample import load_run_model, main as sample_main
    from nanodecoder.finetune.template import answer
    from nanodecoder.hf import import_hf
    from nanodecoder.hf.__main__ import main as hf_main
    d = tmp_path / "hf"
    hf_tok = hf_chat_dir(d)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(d)
    run = import_hf(d, tmp_path / "run")
    assert (run.path / "tokenizer" / "chat.json").is_file()
    ours, tok, _, _ = load_run_model(run.path)
    assert tok.chat is not None and tok.chat.template == CHATML
    q = "What is 2+2?"
    prompt_ids = ids_of(hf_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                   tokenize=True))
    want = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False)[0, len(prompt_ids):]
    template = ChatPrompt(tok)
    got = answer(ours, template, q, max_new_tokens=6)
    text, _ = template.response(want.tolist())
    assert got == text
    capsys.readouterr()
    assert sample_main([str(run.path), "--chat", q, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == got + "\n"
    assert answer_main([str(run.path), q, "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out == got + "\n" and "using its chat template" in captured.err
    assert hf_main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHATML


def test_answer_picks_the_template_a_run_was_tuned_with(chat_dir):
    from types import SimpleNamespace
    from nanodecoder.cli.answer import run_template
    from nanodecoder.config.declare import build
    from nanodecoder.finetune.spec import InstructionSpec
    from nanodecoder.finetune.template import PromptTemplate
    d, _ = chat_dir
    tok = HFTokenizer.from_file(d / "tokenizer.json")
    tok.chat = read_model_chat(d)
    chat_run = SimpleNamespace(finetune=build(InstructionSpec, {"from": "s", "data": "d", "template": {"chat": True}}))
    text_run = SimpleNamespace(finetune=build(InstructionSpec, {"from": "s", "data": "d"}))
    untuned = SimpleNamespace(finetune=None)
    kinds = lambda spec, chat=None: type(run_template(spec, tok, chat)[0])  # noqa: E731
    assert kinds(chat_run) is ChatPrompt and kinds(chat_run, False) is PromptTemplate
    assert kinds(text_run) is PromptTemplate and kinds(text_run, True) is ChatPrompt
    assert kinds(untuned) is ChatPrompt and kinds(untuned, False) is PromptTemplate
    tok.chat = None
    assert kinds(untuned) is PromptTemplate
    with pytest.raises(DataError, match="has no chat template"):
        run_template(untuned, tok, True)
