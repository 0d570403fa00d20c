"""Prompt files: one prompt a line or JSONL; what is refused, naming the file and line."""

from __future__ import annotations

import pytest

from pickscore.datasets.prompts import read_prompts


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n  a dog  \n\n\n")
    assert [(p.index, p.text, p.id) for p in read_prompts(tmp_path / "p.txt")] == [
        (0, "a cat", None),
        (1, "a dog", None),
    ]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "id": 7}\n{"prompt": "a dog"}\n')
    assert [(p.index, p.text, p.id) for p in read_prompts(tmp_path / "p.jsonl")] == [
        (0, "a cat", "7"),
        (1, "a dog", None),
    ]
    cases = {
        "gap.txt": ("a cat\n\na dog\n", "line 2: empty"),
        "empty.txt": ("\n\n", "no prompts"),
        "bad.jsonl": ('{"prompt": "a cat"}\n{"text": "a dog"}\n', 'line 2: expected {"prompt"'),
        "twice.jsonl": ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n', "line 2: id '1' repeats"),
        "broken.jsonl": ('{"prompt": \n', "line 1: not JSON"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(Exception, match=message.replace("{", r"\{")) as e:
            read_prompts(tmp_path / name)
        assert type(e.value).__name__ == "InvalidInput" and name in str(e.value)
