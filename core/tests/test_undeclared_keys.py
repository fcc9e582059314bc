from pydantic import BaseModel, ConfigDict, Field

from selfflow.core.undeclared_keys import undeclared_keys


class Lax(BaseModel):
    size: int = 1
    rate: float = Field(0.5, alias="lr")


def test_keys_a_lax_model_would_drop_are_listed():
    assert undeclared_keys(Lax, {"size": 2, "lr": 0.1, "rate": 0.2}) == []
    assert undeclared_keys(Lax, {"sise": 2, "size": 3, "zz": 0}) == ["sise", "zz"]
    assert undeclared_keys(Lax, None) == []


def test_models_that_forbid_or_keep_extras_handle_them_themselves():
    class Strict(Lax):
        model_config = ConfigDict(extra="forbid")

    class Keeps(Lax):
        model_config = ConfigDict(extra="allow")

    assert undeclared_keys(Strict, {"sise": 2}) == [] and undeclared_keys(Keeps, {"sise": 2}) == []
