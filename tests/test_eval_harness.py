"""llama_jax as an lm-evaluation-harness backend, request by request against lm-eval's own HF backend
(HFLM on transformers' LlamaForCausalLM, fp32, the same weights and tokenizer.json, offline), and
few-shot prompts byte for byte against lm-eval's for the same task, seed and K."""
import json
import re
import os
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_jax.data.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402
from llama_jax.evaluation.loading import place_model  # noqa: E402
from llama_jax.evaluation.suite import build_prompts, load_task_file  # noqa: E402
from oracle import hf_model, lm_eval_task, ours_from_hf  # noqa: E402
from test_eval import CFG, TOL, VOCAB, WORDS, sentence  # noqa: E402  (the same tiny model and sentences)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face checkpoint directory: random fp32 LlamaForCausalLM + a tokenizer.json (converted
    by transformers from our SentencePiece model) that adds BOS, as LLaMA's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(sentence(rng, 12) for _ in range(400)), encoding="utf-8")
    sp_path = train_sentencepiece([str(corpus)], VOCAB, str(out / "sp"))
    proto = pb.ModelProto()
    proto.ParseFromString(open(sp_path, "rb").read())
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)})
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(out)
    hf_model(CFG, seed=4).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ours(hf_dir):
    from llama_jax.evaluation.harness import lm_class

    hf = hf_model(CFG, seed=4)
    params = nnx.to_pure_dict(nnx.state(ours_from_hf(hf, CFG), nnx.Param))
    model = place_model(CFG, params, dtype="fp32", tokenizer=load_tokenizer(str(hf_dir / "tokenizer.json")))
    return lm_class()(model=model, batch_size=4, max_gen_toks=8)


@pytest.fixture(scope="module")
def theirs(hf_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), backend="causal", dtype="float32", batch_size=4, device="cpu")


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_per_request_equals_lm_eval_hf_backend(ours, theirs):
    rng = np.random.default_rng(1)
    long_context = " ".join(sentence(rng, 12) for _ in range(8))  # beyond the 64-token context: cut left
    question = "Question: " + sentence(rng, 4) + "\nAnswer:"
    pairs = [("The cat sat", " on a mat."), (question, " yes"), ("", "Birds sang."), ("Dogs ran ", "far away"),
             (long_context, " " + sentence(rng, 3)), (question, " no, " + sentence(rng, 3)), (question, " maybe"),
             ("The cat sat", " in the green trees every morning.")]  # contexts shared by several continuations
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    want = theirs.loglikelihood(requests("loglikelihood", pairs))
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert abs(g - w) <= TOL and g_greedy == w_greedy


def test_loglikelihood_rolling_per_request_equals_lm_eval_hf_backend(ours, theirs):
    rng = np.random.default_rng(2)
    texts = [sentence(rng, 5), " ".join(sentence(rng, 12) for _ in range(12)), sentence(rng, 30)]  # 1 to 6 windows
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    want = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_greedy_generate_until_is_identical_text(ours, theirs):
    rng = np.random.default_rng(3)
    kwargs = [{"until": ["."], "do_sample": False, "max_gen_toks": 8},
              {"until": ["\n", "the"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 6}]
    args = [(sentence(rng, n), kwargs[n % 2]) for n in (2, 5, 9, 3, 14)]
    got = ours.generate_until(requests("generate_until", args))
    want = theirs.generate_until(requests("generate_until", args))
    assert got == want and sum(len(t) for t in got) > 20  # real text, not empty strings


def test_sampled_repeats_get_distinct_seeds(ours):
    """lm-eval sends `repeats: k` as k identical requests; each must be a different sample (maj@k)."""
    kwargs = {"until": ["\n"], "do_sample": True, "temperature": 1.0, "max_gen_toks": 8}
    args = [("The cat", kwargs)] * 4 + [("Dogs ran", kwargs)] * 4
    texts = ours.generate_until(requests("generate_until", args))
    assert len(set(texts[:4])) > 1 and len(set(texts[4:])) > 1
    assert ours.generate_until(requests("generate_until", args)) == texts  # seeded: reproducible


# ----------------------------------------------------------------------------------- few-shot prompts

def lm_eval_contexts(task_dir, name, k, limit=None):
    _, instances = lm_eval_task(task_dir, name, k, limit)
    by_doc = {}
    for inst in instances:
        by_doc.setdefault(inst.doc_id, inst.args[0])
    return [by_doc[i] for i in sorted(by_doc)]


def test_fewshot_prompts_are_lm_eval_byte_for_byte(tmp_path):
    """gsm8k's stock YAML (included, pointed at local files) and a multiple-choice task drawing shots
    from its own items: the same prompts for the same seed and K."""
    import lm_eval.tasks as stock

    rng = np.random.default_rng(4)
    train = [{"question": sentence(rng, 6) + "?", "answer": f"{sentence(rng, 4)}\n#### {i}"} for i in range(9)]
    test = [{"question": sentence(rng, 5) + "?", "answer": f"So.\n#### {i * 7}"} for i in range(6)]
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"gsm_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gsm8k_yaml = os.path.join(os.path.dirname(stock.__file__), "gsm8k", "gsm8k.yaml")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "gsm_local.yaml").write_text(
        f"include: {gsm8k_yaml}\ntask: gsm_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {tmp_path / 'gsm_train.jsonl'}\n    test: {tmp_path / 'gsm_test.jsonl'}\n")
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"ours_{name}.jsonl").write_text("".join(json.dumps(
            {"type": "generate", "context": f"Question: {r['question']}\nAnswer:", "answers": [r["answer"]]}) + "\n"
            for r in rows))
    (tmp_path / "ours.yaml").write_text("test: ours_test.jsonl\nfewshot: ours_train.jsonl\nanswer_format: gsm8k\n")
    ours = load_task_file(str(tmp_path / "ours.yaml"))
    for k in (0, 1, 5):
        assert build_prompts(ours, k, 1234) == lm_eval_contexts(tmp_path / "lm", "gsm_local", k)

    mc = [{"context": f"Question: {sentence(rng, 4)}\nAnswer:", "choices": [sentence(rng, 2), sentence(rng, 3)],
           "label": i % 2} for i in range(7)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tmp_path / "lm" / "mc_local.yaml").write_text(
        f"task: mc_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\nfewshot_split: test\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n")
    mc_task = load_task_file(str(tmp_path / "mc.jsonl"))
    for k in (1, 3, 6):
        assert build_prompts(mc_task, k, 1234) == lm_eval_contexts(tmp_path / "lm", "mc_local", k)
    assert build_prompts(mc_task, 2, 1234, limit=3) == lm_eval_contexts(tmp_path / "lm", "mc_local", 2, limit=3)


def _local_gsm8k_task(tmp_path, name: str, rows: list[dict], extra: str = "", max_gen_toks: int = 6) -> Path:
    """A task YAML including lm-eval's stock gsm8k.yaml, pointed at `rows` in a local file: its directory."""
    import lm_eval.tasks as stock

    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gsm8k_yaml = os.path.join(os.path.dirname(stock.__file__), "gsm8k", "gsm8k.yaml")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{name}.yaml").write_text(
        f"include: {gsm8k_yaml}\ntask: {name}\n{extra}dataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {tmp_path / 'gsm.jsonl'}\n    test: {tmp_path / 'gsm.jsonl'}\n"
        f"generation_kwargs:\n  until: ['Question:']\n  do_sample: false\n  max_gen_toks: {max_gen_toks}\n")
    return tmp_path / "tasks"


def test_eval_py_harness_runs_stock_gsm8k_offline(hf_dir, tmp_path, capsys):
    """`eval.py harness` on a Hugging Face directory: the stock gsm8k YAML included and pointed at a local
    file (its prompt and filters run offline), results and per-sample logs written; an unknown task is
    refused before any model is loaded, naming the task files that do not parse."""
    import importlib

    cli = importlib.import_module("eval")
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.\n#### {2 * i}"} for i in range(4)]
    tasks = _local_gsm8k_task(tmp_path, "gsm_tiny", rows)
    common = ["--dtype", "fp32", "--distributed", "off", "--include-path", str(tasks)]
    assert cli.main(["harness", str(hf_dir), "--tasks", "gsm_tiny", "--num-fewshot", "1", "--limit", "3",
                     "--output-dir", str(tmp_path / "out"), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["results"]["gsm_tiny"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_gsm_tiny.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 0, 1, 1, 2, 2]  # one record per document and filter
    assert all(json.dumps(s["arguments"]).count("Question: ") == 2 for s in samples)  # 1 shot + the question
    # lm-eval skips a task YAML it cannot parse without a word, so its task looks unknown: the error names
    # the file and the YAML problem (one line). A file with lm-eval's `!function` tag parses.
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir()
    (tasks / "fine.yaml").write_text("task: fine\ndataset_path: json\nprocess_results: !function utils.process\n")
    (tasks / "sub" / "mine.yaml").write_text("task: mine\ndataset_path: json\ngeneration_kwargs: {until: [\n")
    (tasks / "sub" / "tabs.yaml").write_text("task: tabs\n\tdataset_path: json\n")
    assert cli.main(["harness", str(hf_dir), "--tasks", "mine", *common]) == 2
    assert capsys.readouterr().err == (
        f"error: unknown lm-eval task 'mine' (stock tasks and {tasks}); {tasks / 'sub' / 'mine.yaml'}: invalid YAML: "
        f"expected the node content, but found '<stream end>' at line 4, column 1 (and 1 more unparsable task file)\n")


def test_eval_py_tasks_generative_and_code(hf_dir, ours, tmp_path, capsys):
    """Native generative and code tasks: completions are the backend's greedy text (itself equal to lm-eval
    HF's above), exact match and pass@1 follow from them."""
    import importlib

    cli = importlib.import_module("eval")
    gen = [{"type": "generate", "context": f"Question: {q}\nAnswer:", "answers": [a]}
           for q, a in (("The cat sat", "on a mat"), ("Dogs ran", "far"), ("Birds sang", "in trees"))]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    code = [{"type": "code", "prompt": "def f(x):\n", "tests": "def check(c):\n    assert c(1) == 1\n",
             "entry_point": "f", "id": "c0"}]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code))
    (tmp_path / "qa.yaml").write_text("test: qa.jsonl\nnum_fewshot: 1\n")  # a code task has no shots to draw
    args = ["tasks", str(hf_dir), "--tasks", f"{tmp_path / 'qa.yaml'},{tmp_path / 'code.jsonl'}", "--max-new-tokens", "6", "--dtype", "fp32", "--distributed", "off", "--output-dir", str(tmp_path / "o")]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    records = [json.loads(x) for x in (tmp_path / "o" / "qa.jsonl").read_text().splitlines()]
    want = ours.generate_until(requests("generate_until", [(r["prompt"], {"until": ["\n\n"], "max_gen_toks": 6})
                                                           for r in records]))
    assert [r["completions"][0] for r in records] == want
    assert result["qa"] == {"exact_match": float(np.mean([r["correct"][0] for r in records])), "n": 3}
    assert result["code"] == {"pass@1": 0.0, "n": 1}  # a random model writes no working function


def test_maj_at_k_through_lm_eval_votes_over_k_distinct_samples(ours, tmp_path):
    """`repeats: k` with sampling and lm-eval's majority_vote filter, run by lm_eval.simple_evaluate on the
    llama_jax backend: every document gets exactly k responses, they are distinct samples (one seed each),
    the filtered answer is the most common of the k extracted answers (first seen on ties) and exact match
    is the share of documents whose vote is the target."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    k, docs = 5, 6
    rows = [{"question": f"The cat {word}", "answer": letter} for word, letter in zip(WORDS, "tseoarn"[:docs])]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "maj.yaml").write_text(
        f"task: maj\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'qa.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        f"repeats: {k}\ngeneration_kwargs:\n  until: ['\\n']\n  do_sample: true\n  temperature: 1.0\n"
        "  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\nfilter_list:\n  - name: maj\n    filter:\n"
        "      - function: regex\n        regex_pattern: '([a-z])'\n      - function: majority_vote\n"
        "      - function: take_first\n")
    out = lm_eval.simple_evaluate(model=ours, tasks=["maj"], log_samples=True, fewshot_random_seed=1234,
                                  task_manager=TaskManager(include_defaults=False, include_path=str(tmp_path / "tasks")))
    samples = sorted(out["samples"]["maj"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(docs))
    votes = []
    for sample in samples:
        (responses,) = sample["resps"]  # one request, its k responses
        assert len(responses) == k and len(set(responses)) > 1  # k samples, not k copies of one
        extracted = [m.group(1) if (m := re.search("([a-z])", r)) else "[invalid]" for r in responses]
        counts = {a: extracted.count(a) for a in extracted}  # insertion order: first seen wins ties
        vote = max(counts, key=counts.get)
        assert sample["filtered_resps"] == [vote]
        votes.append(vote == sample["target"])
    assert out["results"]["maj"]["exact_match,maj"] == pytest.approx(np.mean(votes), abs=1e-12)


def test_eval_py_harness_runs_unsafe_tasks_only_with_consent(hf_dir, tmp_path, capsys):
    """lm-eval runs the programs of tasks marked `unsafe_code` itself, with no sandbox: `eval.py harness`
    refuses them (exit 2, lm-eval's one-line reason) unless --unsafe-run-generated-code."""
    import importlib

    cli = importlib.import_module("eval")
    rows = [{"question": "What is 1 plus 1?", "answer": "It is 2.\n#### 2"}]
    tasks = _local_gsm8k_task(tmp_path, "gsm_unsafe", rows, extra="unsafe_code: true\n", max_gen_toks=4)
    common = [str(hf_dir), "--tasks", "gsm_unsafe", "--num-fewshot", "0", "--limit", "1", "--dtype", "fp32",
              "--distributed", "off", "--include-path", str(tasks)]
    assert cli.main(["harness", *common]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress bars
    assert last == ("error: Attempted to run task: gsm_unsafe which is marked as unsafe: lm-eval runs its generated "
                    "code in-process, without a sandbox; pass --unsafe-run-generated-code to allow it")
    assert cli.main(["harness", *common, "--unsafe-run-generated-code"]) == 0
    assert "gsm_unsafe" in json.loads(capsys.readouterr().out)["results"]


def _compiled_bytes(fn, *args) -> int:
    """Arguments + outputs + temporaries of jitted `fn`'s program for these arguments' shapes."""
    stats = fn.lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def test_rolling_document_memory_follows_its_length_not_max_length(hf_dir, tmp_path):
    """A model with a long max_length (1,024) scoring one ~400-token document as lm-eval's
    loglikelihood_rolling, batch size 16: each program the scorer runs needs at most 1.6x the memory of
    the same computation on exactly one row of the document's length (buckets pad a row by at most a
    quarter; attention's scores grow with its square), not batch_size rows of the max_length bucket."""
    import jax
    import shutil

    from llama_jax.evaluation.harness import lm_class
    from llama_jax.evaluation.loading import load_eval_model

    long_dir = tmp_path / "hf_long"
    hf_model(CFG.replace(max_seq_len=1024), seed=4).save_pretrained(long_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, long_dir / name)
    lm = lm_class()(model=load_eval_model(str(long_dir), dtype="fp32"), batch_size=16)
    assert lm.max_length == 1024
    runs = []
    traced = lm.scorer._sequences
    lm.scorer._sequences = lambda *args: runs.append(args) or traced(*args)
    text = " ".join(sentence(np.random.default_rng(7), 12) for _ in range(6))
    lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    n = len(lm.tok_encode(text)) + 1  # the prefix token and the document: one window
    assert len(runs) == 1 and 150 < n < 1000
    params, tokens, segments, read = runs[0]
    exact = np.ones((1, n), np.int32)
    used, needed = (_compiled_bytes(traced, params, t, s, read) for t, s in ((tokens, segments), (exact, exact)))
    assert used <= 1.6 * needed, (tokens.shape, used, needed)
