"""Evaluation against Hugging Face transformers (torch fp32) on the same weights and token ids.

One tiny model and one tiny SentencePiece tokenizer serve every test; log-likelihoods must agree with
transformers' to 1e-4 (fp32, highest matmul precision), greedy tokens exactly.
"""
import json
import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from llama_jax.model.config import ModelConfig
from llama_jax.evaluation import tasks as tasks_mod
from llama_jax.evaluation.generate import Generator, SamplingConfig, _next_token, warp_logits
from llama_jax.evaluation.loading import place_model
from llama_jax.evaluation.perplexity import evaluate_perplexity, rolling_windows, strided_windows, token_logprobs
from llama_jax.evaluation.scoring import TokenScorer, pack_pieces, plan_batches
from llama_jax.evaluation.catalog import load_tasks
from llama_jax.evaluation.suite import load_task_file
from llama_jax.evaluation.tasks import Item, encode_pair, evaluate_task, multiple_choice_metrics
from llama_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from oracle import hf_logits, hf_model, ours_from_hf

VOCAB = 300
CFG = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                  dtype="float32", attention_impl="xla", norm_eps=1e-5, max_seq_len=64)
WORDS = ("the cat sat on a mat while dogs ran far away from home and birds sang in green trees "
         "under bright blue skies every morning people walk to work").split()
TOL = 1e-4


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, n)).capitalize() + "."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text("\n".join(sentence(rng, 12) for _ in range(400)), encoding="utf-8")
    return load_tokenizer(train_sentencepiece([str(path)], VOCAB, str(path.parent / "tokenizer")))


@pytest.fixture(scope="module")
def hf():
    return hf_model(CFG, seed=3)


@pytest.fixture(scope="module")
def model(hf, tok):
    params = nnx.to_pure_dict(nnx.state(ours_from_hf(hf, CFG), nnx.Param))
    return place_model(CFG, params, dtype="fp32", tokenizer=tok)


@pytest.fixture(scope="module")
def scorer(model):
    return TokenScorer(model, batch_size=2)


def hf_token_logprobs(hf, tokens):
    """log p(tokens[t] | tokens[:t]) for t >= 1, from transformers."""
    logits = torch.as_tensor(hf_logits(hf, np.asarray(tokens)[None])[0])
    logp = torch.log_softmax(logits.double(), -1).numpy()
    return logp[np.arange(len(tokens) - 1), np.asarray(tokens)[1:]], logits[:-1].argmax(-1).numpy()


# ------------------------------------------------------------------------------------- token scores

def test_token_logprobs_and_greedy_flags_match_transformers(hf, scorer):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, VOCAB, n) for n in (7, 40, 2, 17, 64)]  # 3 batches, buckets 16/32/64, padding
    for seq, (logp, greedy) in zip(seqs, scorer.score(seqs)):
        ref, argmax = hf_token_logprobs(hf, seq)
        assert logp.shape == (len(seq) - 1,)
        np.testing.assert_allclose(logp, ref, atol=TOL, rtol=0)
        np.testing.assert_array_equal(greedy, argmax == seq[1:])


def test_continuations_of_shared_contexts_match_transformers(hf, model):
    """Each continuation's log-probabilities given its context, against transformers on the whole
    (context + continuation): contexts shared by several continuations, continuations of 1 to 30 tokens
    packed two to a row (each next to another context's), a one-token context, several batches."""
    rng = np.random.default_rng(5)
    contexts = [rng.integers(0, VOCAB, n) for n in (1, 9, 30, 17)]
    pairs = [(contexts[k], rng.integers(0, VOCAB, n))
             for k, n in ((1, 1), (2, 3), (2, 30), (0, 7), (3, 12), (1, 1), (3, 20), (0, 5), (1, 9), (2, 2), (3, 16))]
    scorer = TokenScorer(model, batch_size=2)  # at most 2 contexts and 2 continuation rows per batch
    for (ctx, cont), (logp, greedy) in zip(pairs, scorer.score_continuations(pairs)):
        ref, argmax = hf_token_logprobs(hf, np.concatenate([ctx, cont]))
        assert logp.shape == (len(cont),)
        np.testing.assert_allclose(logp, ref[-len(cont):], atol=TOL, rtol=0)
        np.testing.assert_array_equal(greedy, argmax[-len(cont):] == cont)


def test_pieces_pack_first_fit_longest_first():
    assert pack_pieces([5, 12, 3, 9, 16, 1], width=16, slots=2) == [[4], [1, 2], [3, 0], [5]]
    assert pack_pieces([4, 4, 4], width=16, slots=1) == [[0], [1], [2]]


def test_batches_keep_groups_together_and_sort_by_length():
    lengths = [5, 50, 7, 30, 6, 8]
    assert plan_batches(lengths, 3) == [[1, 3, 5], [2, 4, 0]]
    # Groups of one item stay in one batch when they fit; a group larger than a batch is split.
    assert plan_batches(lengths, 3, groups=[[0, 1], [2, 3], [4, 5]]) == [[0, 1], [2, 3], [4, 5]]
    assert plan_batches(lengths, 2, groups=[[0, 1, 2, 3, 4]]) == [[0, 1], [2, 3], [4]]


# --------------------------------------------------------------------------------------- perplexity

@pytest.mark.parametrize("n,context,stride", [(10, 16, 15), (40, 16, 5), (41, 16, 15), (17, 16, 1), (33, 8, 7)])
def test_strided_windows_predict_every_token_once(n, context, stride):
    seen = []
    for begin, end, first in strided_windows(n, context, stride):
        assert end - begin <= context and begin < first < end
        assert first - begin >= min(context - stride, first)  # context before the first scored token
        seen += range(first, end)
    assert seen == list(range(1, n))


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 18, 33, 34, 100, 513])
@pytest.mark.parametrize("context", [1, 2, 16, 512])
def test_rolling_windows_are_lm_evaluation_harness_token_for_token(n, context):
    """Our windows over [BOS] + tokens, as (context, continuation) token lists, are exactly what
    lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window give for the tokens
    with BOS as the prefix token."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    bos, tokens = 1, list(range(100, 100 + n))
    doc = [bos] + tokens
    ours = [(doc[begin:first], doc[first:end]) for begin, end, first in rolling_windows(len(doc), context)]
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, bos, context, context_len=1)]
    assert ours == [(list(a), list(b)) for a, b in theirs]


def test_rolling_perplexity_equals_brute_force(hf, scorer):
    """Each token scored alone by transformers with the context lm-eval's windows give it."""
    rng = np.random.default_rng(6)
    doc = rng.integers(0, VOCAB, 70)
    (got,) = token_logprobs(scorer, [doc], context_len=16)
    expected = [hf_token_logprobs(hf, doc[max(0, end - 17):j + 1])[0][-1]
                for begin, end, first in rolling_windows(len(doc), 16) for j in range(first, end)]
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert len(got) == len(doc) - 1


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match="stride must be in"):
        strided_windows(40, 16, 16)


def brute_force_logprobs(hf, tokens, context, stride):
    """Each token j scored alone by transformers, with the context the strided definition gives it:
    from the start of the first window (begins at multiples of stride) whose end passes j."""
    out = []
    for j in range(1, len(tokens)):
        begin = max(0, math.ceil((j - context + 1) / stride)) * stride
        logp, _ = hf_token_logprobs(hf, tokens[begin:j + 1])
        out.append(logp[-1])
    return np.array(out)


def test_strided_perplexity_equals_brute_force(hf, scorer):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, VOCAB, 45), rng.integers(0, VOCAB, 12)]
    got = token_logprobs(scorer, docs, context_len=16, stride=6)
    for doc, logp in zip(docs, got):
        np.testing.assert_allclose(logp, brute_force_logprobs(hf, doc, 16, 6), atol=TOL, rtol=0)


def test_perplexity_and_bits_per_byte_of_texts(hf, tok, scorer):
    """Documents that fit one window: every token after BOS scored by one transformers forward pass."""
    rng = np.random.default_rng(3)
    texts = [sentence(rng, 12), sentence(rng, 4), "Ünïcode café — " + sentence(rng, 6)]
    result = evaluate_perplexity(scorer, texts, tok)
    refs = [hf_token_logprobs(hf, tok.encode(text, bos=True))[0] for text in texts]
    nll, count = -sum(r.sum() for r in refs), sum(len(r) for r in refs)
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result.tokens == count and result.bytes == total_bytes and result.documents == 3
    assert abs(result.mean_nll - nll / count) <= TOL
    assert abs(result.perplexity - math.exp(nll / count)) <= TOL * math.exp(nll / count)
    assert abs(result.bits_per_byte - nll / math.log(2) / total_bytes) <= TOL


# ------------------------------------------------------------------------------------ multiple choice

def test_encode_pair_follows_lm_evaluation_harness(tok):
    ctx, cont = encode_pair(tok, "The cat sat ", "on a mat")  # trailing space moves to the continuation
    whole = tok.encode("The cat sat on a mat")
    assert ctx == tok.encode("The cat sat") and ctx + cont == whole
    assert encode_pair(tok, "", " the cat") == ([tok.bos_id], tok.encode(" the cat", bos=False))
    ctx, cont = encode_pair(tok, "The cat", " sat", bos=False)
    assert ctx[0] != tok.bos_id and ctx + cont == tok.encode("The cat sat", bos=False)


def test_metrics_by_hand():
    lls = [np.array([-1.0, -2.0]), np.array([-5.0, -6.0, -4.0]), np.array([-3.0, -3.5]), np.array([-2.0, -9.0])]
    byte_lengths = [[1, 10], [5, 3, 1], [2, 7], [1, 1]]
    labels = [1, 2, 0, 0]
    m = multiple_choice_metrics(lls, byte_lengths, labels)
    # acc: predictions 0, 2, 0, 0 -> right on items 2, 3, 4: 3/4.
    # acc_norm: scores/bytes: [-1, -0.2] -> 1; [-1, -2, -4] -> 0; [-1.5, -0.5] -> 1; [-2, -9] -> 0: right on 1, 4.
    assert m["acc"] == 0.75 and m["acc_norm"] == 0.5 and m["n"] == 4
    assert abs(m["acc_stderr"] - math.sqrt(0.25) / 2) < 1e-12  # sample std of (0,1,1,1) = 0.5
    assert abs(m["acc_norm_stderr"] - math.sqrt(1 / 3) / 2) < 1e-12  # sample std of (1,0,0,1)


def test_toy_task_scores_match_transformers(hf, tok, scorer, tmp_path):
    rng = np.random.default_rng(4)
    rows = [{"context": sentence(rng, 5), "choices": [sentence(rng, k) for k in (2, 4, 1)], "label": 2, "id": "a"},
            {"context": "Question: " + sentence(rng, 3) + "\nAnswer:", "choices": ["yes", "no"], "label": 0}]
    path = tmp_path / "toy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    items = load_task_file(str(path)).items
    assert [i.id for i in items] == ["a", "2"]
    metrics, records = evaluate_task(scorer, tok, items)
    correct = []
    for row, record in zip(rows, records):
        ctx = tok.encode(row["context"])
        refs, greedy = [], []
        for choice in row["choices"]:
            whole = tok.encode(row["context"] + " " + choice)
            logp, argmax = hf_token_logprobs(hf, whole)
            n = len(whole) - len(ctx)
            refs.append(logp[-n:].sum())
            greedy.append(bool((argmax[-n:] == np.array(whole)[-n:]).all()))
        np.testing.assert_allclose(record["loglikelihoods"], refs, atol=TOL, rtol=0)
        assert record["is_greedy"] == greedy and record["context"] == row["context"]
        correct.append(float(np.argmax(refs) == row["label"]))
    assert metrics["acc"] == np.mean(correct)


def test_bad_task_files_name_the_problem(tmp_path):
    cases = {'{"context": "a", "choices": ["x", "y"], "label": 2}': r"bad.jsonl:1: key 'label'",
             '{"context": "a", "choices": ["x"], "label": 0}': r"bad.jsonl:1: key 'choices'",
             '{"choices": ["x", "y"], "label": 0}': r"bad.jsonl:1: key 'context'",
             'not json': r"bad.jsonl:1: not valid JSON"}
    for line, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            load_task_file(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_tasks(["nope"])


def test_catalog_records_map_to_lm_eval_prompts():
    """Records shaped as tensorflow_datasets returns them (text as bytes) give lm-eval's prompts."""
    arc = tasks_mod.arc_item(0, {"id": b"q1", "question": b"Which is hot?", "answerKey": 2,
                                 "choices": {"text": np.array([b"ice", b"snow", b"fire"]), "label": np.array([0, 1, 2])}})
    assert arc.contexts[0] == "Question: Which is hot?\nAnswer:" and arc.continuations == (" ice", " snow", " fire")
    assert arc.label == 2
    wino = tasks_mod.winogrande_item(3, {"sentence": b"Ann gave Bo a gift because _ was kind.", "option1": b"Ann",
                                         "option2": b"Bo", "label": 0})
    assert wino.contexts == ("Ann gave Bo a gift because Ann", "Ann gave Bo a gift because Bo")
    assert wino.continuations == (" was kind.", " was kind.") and wino.label == 0
    hella = tasks_mod.hellaswag_item(0, {"activity_label": b"Cooking", "context": b"A man cuts [title] onions.",
                                         "endings": [b"He  cries.", b"[header] It rains."], "label": 0,
                                         "source_id": b"s"})
    # lm-eval strips before removing "[header]", so that ending keeps a space after the delimiter's.
    assert hella.contexts[0] == "Cooking: A man cuts. onions." and hella.continuations == (" He cries.", "  It rains.")
    boolq = tasks_mod.boolq_item(0, {"passage": b"Sky is blue.", "question": b"is the sky blue", "answer": True})
    assert boolq.contexts[0] == "Sky is blue.\nQuestion: is the sky blue?\nAnswer:" and boolq.label == 1
    obqa = tasks_mod.openbookqa_item(0, {"question": {"stem": b"Sun is a", "choice_A": b"star", "choice_B": b"moon",
                                                      "choice_C": b"rock", "choice_D": b"gas"}, "answerKey": 0})
    assert obqa.contexts[0] == "Sun is a" and obqa.continuations[0] == " star" and obqa.label == 0


def test_prepared_tfds_piqa_is_read_offline(tmp_path):
    """A tiny PIQA prepared in a temp data_dir (same name, version and features as the catalog's) is
    read through the catalog builder; nothing is downloaded."""
    tfds = pytest.importorskip("tensorflow_datasets")
    catalog = tfds.builder_cls("piqa")

    class Piqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = catalog.VERSION

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "goal": tfds.features.Text(), "sol1": tfds.features.Text(),
                "sol2": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                yield i, {"id": f"p{i}", "goal": f"goal {i}", "sol1": "a", "sol2": f"b{i}", "label": i % 2}

    Piqa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    (task,) = load_tasks(["piqa"], data_dir=str(tmp_path))
    name, items = task.name, task.items
    by_id = {item.id: item for item in items}  # TFDS stores records in its own shuffled order
    assert name == "piqa" and sorted(by_id) == ["p0", "p1", "p2"]
    assert [by_id[f"p{i}"].label for i in range(3)] == [0, 1, 0]
    assert by_id["p1"].contexts[0] == "Question: goal 1\nAnswer:" and by_id["p1"].continuations == (" a", " b1")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_tasks(["piqa"], data_dir=str(tmp_path), split="test")
    with pytest.raises(ValueError, match="not prepared"):
        load_tasks(["hellaswag"], data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------- command line

def test_command_line_on_a_hugging_face_directory(hf, tok, tmp_path, capsys):
    """eval.py reads a Hugging Face directory (converted in memory) with its own tokenizer, on a
    one-device mesh; its numbers are transformers' on the same weights."""
    import importlib
    import shutil

    cli = importlib.import_module("eval")
    ckpt = tmp_path / "hf"
    hf.save_pretrained(ckpt)
    shutil.copy(tok.path, ckpt / "tokenizer.model")
    rng = np.random.default_rng(5)
    texts = [sentence(rng, 8), sentence(rng, 5)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    common = ["--dtype", "fp32", "--distributed", "off"]

    assert cli.main(["perplexity", str(ckpt), "--data", str(tmp_path / "docs.jsonl"), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    refs = [hf_token_logprobs(hf, tok.encode(t))[0] for t in texts]
    mean_nll = -sum(r.sum() for r in refs) / sum(len(r) for r in refs)
    assert abs(result["mean_nll"] - mean_nll) <= TOL and result["context_len"] == CFG.max_seq_len

    task = tmp_path / "toy.jsonl"
    task.write_text(json.dumps({"context": "The cat", "choices": ["sat on a mat", "ran far"], "label": 0}) + "\n")
    assert cli.main(["tasks", str(ckpt), "--tasks", str(task), "--output-dir", str(tmp_path / "out"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["toy"]["n"] == 1
    record = json.loads((tmp_path / "out" / "toy.jsonl").read_text())
    refs = []
    for choice in ("sat on a mat", "ran far"):
        whole = tok.encode("The cat " + choice)
        refs.append(hf_token_logprobs(hf, whole)[0][len(tok.encode("The cat")) - 1:].sum())
    np.testing.assert_allclose(record["loglikelihoods"], refs, atol=TOL, rtol=0)

    assert cli.main(["generate", str(ckpt), "--prompt", "The cat", "--max-new-tokens", "5", "--ignore-eos",
                     *common]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = tok.encode("The cat")
    expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=5, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert out["generations"][0]["completion"] == tok.decode(expected.tolist()) and out["new_tokens"] == 5


def test_command_line_no_bos_limit_and_prompt_file(hf, tok, model, tmp_path, capsys):
    """Flags against transformers on the same weights (a params directory): `perplexity --no-bos` scores
    each text's tokens without BOS in front (its first token unscored); `tasks --limit 2` scores exactly
    the first two items as a run without the limit does; `generate --prompt-file` continues every
    non-blank line, in order, as transformers' greedy generate does."""
    import importlib

    from llama_jax.checkpoint.params import save_params

    cli = importlib.import_module("eval")
    ckpt = str(tmp_path / "ckpt")
    save_params(ckpt, jax.tree.map(np.asarray, model.params), CFG, tokenizer_path=tok.path)
    common = ["--dtype", "fp32", "--distributed", "off"]
    rng = np.random.default_rng(6)
    texts = [sentence(rng, 9), sentence(rng, 4)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")

    assert cli.main(["perplexity", ckpt, "--data", str(tmp_path / "docs.jsonl"), "--no-bos", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    refs = [hf_token_logprobs(hf, tok.encode(t, bos=False))[0] for t in texts]
    assert result["tokens"] == sum(len(r) for r in refs)
    assert abs(result["mean_nll"] - (-sum(r.sum() for r in refs) / result["tokens"])) <= TOL

    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"context": sentence(rng, 3), "choices": [sentence(rng, 2), sentence(rng, 1)],
                                        "label": i % 2}) + "\n" for i in range(4)), encoding="utf-8")
    runs = {}
    for name, limit in (("all", []), ("limited", ["--limit", "2"])):
        out = tmp_path / name
        assert cli.main(["tasks", ckpt, "--tasks", str(task), "--output-dir", str(out), *limit, *common]) == 0
        runs[name] = (json.loads(capsys.readouterr().out)["toy"],
                      [json.loads(line) for line in (out / "toy.jsonl").read_text().splitlines()])
    assert runs["all"][0]["n"] == 4 and runs["limited"][0]["n"] == 2
    # The same items, scored in batches of other shapes: equal log-likelihoods up to fp32 rounding.
    for limited, full in zip(runs["limited"][1], runs["all"][1][:2]):
        assert np.allclose(limited.pop("loglikelihoods"), full.pop("loglikelihoods"), rtol=1e-6, atol=TOL)
        assert limited == full
    assert len(runs["limited"][1]) == 2

    prompts = ["The cat sat", "Birds", "Every morning people walk"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n", encoding="utf-8")
    assert cli.main(["generate", ckpt, "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4",
                     "--ignore-eos", *common]) == 0
    generations = json.loads(capsys.readouterr().out)["generations"]
    assert [g["prompt"] for g in generations] == prompts
    for g in generations:
        ids = tok.encode(g["prompt"])
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=4, eos_token_id=None, pad_token_id=0)[0, len(ids):]
        assert g["completion"] == tok.decode(expected.tolist()) and g["new_tokens"] == 4


def test_params_directory_loads_with_its_tokenizer(hf, tok, model, tmp_path):
    """A llama_jax params directory (what `convert --to orbax` writes) loads onto a one-device mesh with
    the weights and tokenizer it was saved with; a tokenizer of another vocabulary is refused."""
    from llama_jax.checkpoint.params import save_params
    from llama_jax.evaluation.loading import load_eval_model

    params = jax.tree.map(np.asarray, model.params)
    save_params(tmp_path / "ckpt", params, CFG, tokenizer_path=tok.path)
    loaded = load_eval_model(str(tmp_path / "ckpt"), dtype="fp32")
    assert loaded.mesh is not None and loaded.cfg == CFG and loaded.tokenizer.vocab_size == VOCAB
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    other = tmp_path / "other"
    other.write_text("\n".join(sentence(np.random.default_rng(9), 12) for _ in range(300)), encoding="utf-8")
    other_tok = train_sentencepiece([str(other)], VOCAB + 20, str(other))
    with pytest.raises(ValueError, match=f"vocab_size is {VOCAB}"):
        load_eval_model(str(tmp_path / "ckpt"), dtype="fp32", tokenizer_path=other_tok)


def test_command_line_reports_bad_input(tmp_path, capsys):
    import importlib

    cli = importlib.import_module("eval")
    assert cli.main(["perplexity", str(tmp_path), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert cli.main(["tasks", str(tmp_path), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--stride", "0"], "--stride must be >= 1, got 0"),
    (["--context-len", "0"], "--context-len must be >= 2, got 0"),
    (["--context-len", "-3"], "--context-len must be >= 2, got -3"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--context-len", "8", "--stride", "8"], "--stride must be below --context-len (8), got 8"),
])
def test_impossible_window_flags_are_refused_before_anything_is_read(tmp_path, capsys, flags, message):
    """0 used to mean "the default" silently; now it is an error, found before the data or model is read
    (the data file does not even exist here)."""
    import importlib

    cli = importlib.import_module("eval")
    assert cli.main(["perplexity", str(tmp_path), "--data", str(tmp_path / "missing.txt"), *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_perplexity_beyond_float_range_is_inf_not_an_overflow(tmp_path):
    from llama_jax.cli.eval import _Emitter
    from llama_jax.evaluation.perplexity import PerplexityResult

    finite = PerplexityResult(nll_sum=7000.0, tokens=10, bytes=40, documents=1)
    assert finite.perplexity == math.exp(700.0)
    huge = PerplexityResult(nll_sum=7200.0, tokens=10, bytes=40, documents=1)  # mean NLL 720 > ln(float max)
    assert huge.perplexity == math.inf and huge.mean_nll == 720.0
    _Emitter()(huge.as_dict(), str(tmp_path / "out.json"))  # results are written, not lost
    assert json.loads((tmp_path / "out.json").read_text())["perplexity"] == math.inf


def test_old_underscore_flags_still_work_with_a_deprecation_warning(capsys):
    """One flag style (`--kebab-case`); the underscore spellings stay as hidden aliases for one release."""
    from llama_jax.cli.eval import _parser

    parser = _parser()
    new = parser.parse_args(["generate", "ckpt", "--max-new-tokens", "7", "--no-bos", "--prompt-file", "p.txt"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["generate", "ckpt", "--max_new_tokens", "7", "--no_bos", "--prompt_file", "p.txt"])
    err = capsys.readouterr().err
    assert vars(old) == vars(new)
    assert "--max_new_tokens is deprecated and will be removed; use --max-new-tokens" in err
    assert "--no_bos is deprecated" in err and "--prompt_file is deprecated" in err
    generate_help = parser._subparsers._group_actions[0].choices["generate"].format_help()
    assert "--max-new-tokens" in generate_help and "--max_new_tokens" not in generate_help
