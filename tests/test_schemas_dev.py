"""Real-world schemas (a fixed slice of ../shared/schemas-dev, JSONSchemaBench's datasets): accepted,
filled validly by a random model, and complete from each schema's reported minimum budget up."""

import json

import pytest

from conftest import require_shared
from lfm_mlx.bench_schemas import TEXT, run
from lfm_mlx.constrain import JSONConstraint
from lfm_mlx.extract import extract

EVERY = 12  # 22 of the 259 schemas, every dataset represented


@pytest.fixture(scope="module")
def dev_schemas():
    directory = require_shared().parent / "schemas-dev"
    if not directory.is_dir():
        pytest.skip(f"{directory} is absent: the dev schemas live beside the project in ../shared")
    return directory


def test_a_slice_of_real_schemas_is_accepted_and_filled_validly(tiny, dev_schemas):
    model, tokenizer = tiny
    outcomes = run(model, tokenizer, dev_schemas, every=EVERY, max_tokens=512, progress=False)
    assert len({o.dataset for o in outcomes}) >= 8 and len(outcomes) >= 20
    assert not [o for o in outcomes if o.crash]
    accepted = [o for o in outcomes if o.accepted]
    assert len(accepted) >= 0.97 * len(outcomes), [(o.name, o.reason) for o in outcomes if not o.accepted]
    assert sum(o.valid for o in outcomes) >= 0.95 * len(outcomes), [(o.name, o.reason) for o in outcomes
                                                                    if not o.valid]


def test_every_accepted_schema_closes_within_its_reported_minimum(tiny, dev_schemas):
    model, tokenizer = tiny
    for path in sorted(dev_schemas.rglob("*.json"))[::EVERY]:
        schema = json.loads(path.read_text(encoding="utf-8"))
        minimum = JSONConstraint(tokenizer, schema, vocab_size=model.args.vocab_size, max_tokens=4096).minimal_tokens()
        result = extract(model, tokenizer, TEXT, schema, max_tokens=minimum)
        assert result.valid, (path.name, minimum, result.error)
