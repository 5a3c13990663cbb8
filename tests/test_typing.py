"""``typing.overload`` for the functional API's forms that return more than the output: a type checker sees a
tensor for the default call and a tuple for ``return_blocks=True`` / ``return_indices=True``."""

import inspect
import typing

import pytest
import torch

from difattn import functional


@pytest.mark.parametrize("fn, flag, extra", [
    (functional.pisa_attention, "return_blocks", torch.Tensor),
    (functional.llsa_attention, "return_indices", list[torch.Tensor]),
])
def test_overloads_give_the_return_type_of_each_form(fn, flag, extra):
    overloads = typing.get_overloads(fn)
    returns = {typing.get_type_hints(o)[flag]: typing.get_type_hints(o)["return"] for o in overloads}
    assert returns == {
        typing.Literal[False]: torch.Tensor,
        typing.Literal[True]: tuple[torch.Tensor, extra],
        bool: torch.Tensor | tuple[torch.Tensor, extra],
    }
    implementation = inspect.signature(fn).parameters
    for o in overloads:  # same names, kinds and order as the implementation
        params = inspect.signature(o).parameters
        assert [(p.name, p.kind) for p in params.values()] == [(p.name, p.kind) for p in implementation.values()]
