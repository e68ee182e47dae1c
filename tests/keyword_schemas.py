"""JSON schemas that both the constraint and the extraction tests run: one keyword family each."""

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SHARED_KEYWORD_SCHEMAS = {
    "object_required_no_extra": {"type": "object", "properties": {"name": NAME, "ok": {"type": "boolean"}},
                                 "required": ["name", "ok"], "additionalProperties": False},
    "array_min_max_items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                            "minItems": 2, "maxItems": 4},
    "enum_const": {"type": "object", "required": ["color", "version"], "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "version": {"const": 2}}},
    "pattern_and_lengths": {"type": "object", "required": ["code", "word"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "word": {"type": "string", "minLength": 3, "maxLength": 5}}},
}
