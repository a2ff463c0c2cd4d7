"""A random-access source of visual questions over a user's own images and a JSONL file of questions.

Each JSONL line is one question (the VQA v2 layout: 10 annotators' answers per question)::

    {"image": "val2014/COCO_val2014_000000000042.jpg", "question": "what is on the plate?",
     "answers": ["pizza", "pizza", ...], "question_id": 42000, "question_type": "what is on the"}

`image` is relative to `image_dir` (absolute paths are kept; both may be in a bucket, see
`mmjax.paths`). `answers` is a list of strings (a single string counts as one answer);
`question_id` and `question_type` are optional. Examples come back as
`{"image": uint8 (H, W, 3) RGB, "question": str, "answers": list of str, ...}`, the answers padded
with "" to one length for the whole file (at least 10), because a batch stacks them: the vqa
evaluator drops the "" padding before scoring. An optional field is yielded when every usable line
has it (a warning says when only some do).

Bad entries are handled as `mmjax.data.folder` does: lines that are not JSON, lack an image, a
question or an answer, or name a missing image are skipped when the source is built (one warning
with the counts and the first line numbers; `source.skipped` holds the counts); images that fail to
decode are counted when read (None is returned; the pipeline fills the slot with the next example).
A wrong path, or a file with no usable line (the error lists the first problems by line number), is
an error right away, before anything compiles.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from mmjax import paths
from mmjax.data import folder
from mmjax.data.webdataset import SkipCounter

log = logging.getLogger(__name__)

ANNOTATORS = 10            # VQA v2's answers per question: the least length answers are padded to
OPTIONAL_FIELDS = ("question_id", "question_type")
PADDING = ""


class VqaFolderSource:
    """Returns `{"image", "question", "answers"}` (+ the optional fields), or None for an unreadable image."""

    def __init__(self, image_dir: str | os.PathLike, questions: str | os.PathLike):
        image_dir = paths.expand(os.fspath(image_dir))
        questions = paths.expand(os.fspath(questions))
        if not paths.isdir(image_dir):
            raise FileNotFoundError(f"vqa_folder data: image_dir {image_dir!r} is not a directory")
        if not paths.isfile(questions):
            raise FileNotFoundError(f"vqa_folder data: questions file {questions!r} does not exist")
        self._image_dir = image_dir
        self._unreadable = SkipCounter("vqa_folder data")
        records, problems = read_questions(questions)
        kept = folder.keep_present_images(records, image_dir, lambda r: r[1]["image"], problems)
        self._records = [record for _, record in kept]
        self.skipped = folder.report_skipped_lines("vqa_folder data", "questions file", questions, len(self._records),
                                                   problems)
        self.num_answers = max([ANNOTATORS] + [len(r["answers"]) for r in self._records])
        self.fields = ("image", "question", "answers") + self._uniform_optional_fields(questions)

    def _uniform_optional_fields(self, questions: str) -> tuple[str, ...]:
        """The optional fields every usable line has; a warning names those only some lines have."""
        fields = []
        for field in OPTIONAL_FIELDS:
            having = sum(field in r for r in self._records)
            if having == len(self._records):
                fields.append(field)
            elif having:
                log.warning("vqa_folder data: %r is on %d of %d usable lines of %r; it is left out of the examples",
                            field, having, len(self._records), questions)
        return tuple(fields)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict | None:
        record = self._records[index]
        array = folder.read_rgb(paths.join(self._image_dir, record["image"]), index, self._unreadable)
        if array is None:
            return None
        answers = list(record["answers"]) + [PADDING] * (self.num_answers - len(record["answers"]))
        example = {"image": array, "question": record["question"], "answers": answers}
        example.update({field: record[field] for field in self.fields[3:]})
        return example

    @property
    def unreadable(self) -> int:
        """Images of this process that failed to decode so far."""
        return self._unreadable.total

    def __repr__(self) -> str:
        return f"VqaFolderSource(image_dir={self._image_dir!r}, num_examples={len(self)})"


def read_questions(path: str) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str, str]]]:
    """(line, record) of the usable lines of a questions JSONL, and (line, kind, detail) of the others."""
    records, problems = [], []
    with paths.open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append((line_number, "invalid JSON", str(e)))
                continue
            record, problem = _record(entry)
            if problem is None:
                records.append((line_number, record))
            else:
                problems.append((line_number, *problem))
    return records, problems


def _record(entry: Any) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """The example fields of one parsed line, or (None, (kind, detail)) saying what is wrong with it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"].strip():
        return None, ("no image", 'needs a string "image" field')
    question = entry.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, ("no question", 'needs a non-empty string "question"')
    answers = entry.get("answers")
    answers = [answers] if isinstance(answers, str) else answers
    if (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)
            or not any(a.strip() for a in answers)):
        return None, ("no answer", f'needs "answers": a list of strings with a non-empty one, got {answers!r}')
    record = {"image": entry["image"], "question": question, "answers": [a for a in answers if a.strip()]}
    record.update({field: entry[field] for field in OPTIONAL_FIELDS if entry.get(field) is not None})
    return record, None
