"""ErrorFeedback: e <- v - C(v) for tensors of any shape, from one message or its consecutive pieces, in place."""
import pytest
import torch

from dsq_plugins.engine.memory import ErrorFeedback


def test_residual_of_a_matrix_from_pieces_is_kept_in_place():
    ef = ErrorFeedback()
    g = torch.arange(12.0).reshape(3, 4)
    sent = torch.full((3, 4), 0.5)
    v = ef.compensate("w", g)
    assert v is g                                          # nothing to add yet
    ef.update("w", v, [sent.reshape(-1)[:5], sent.reshape(-1)[5:]])
    e = ef.get("w")
    assert e.shape == (3, 4) and torch.equal(e, g - 0.5)
    scratch = torch.empty(3, 4)
    v2 = ef.compensate("w", g, out=scratch)
    assert v2 is scratch and torch.equal(v2, g + (g - 0.5))
    ef.update("w", v2, sent)
    assert ef.get("w") is e                                # overwritten, not reallocated
    assert torch.equal(e, 2 * g - 1.0)


def test_pieces_must_cover_the_tensor():
    ef = ErrorFeedback()
    with pytest.raises(ValueError, match="pieces hold 3 elements, the tensor 4"):
        ef.update("b", torch.ones(4), [torch.ones(3)])


def test_disabled_keeps_nothing():
    ef = ErrorFeedback(enabled=False)
    ef.update("b", torch.ones(4), torch.zeros(4))
    assert ef.get("b") is None and ef.compensate("b", torch.ones(4)).sum() == 4


def test_swap_makes_what_was_left_the_residual_without_a_copy():
    ef = ErrorFeedback()
    left = torch.full((3,), 0.25)
    spare = ef.swap("w", left)
    assert ef.get("w") is left and spare.shape == (3,) and spare is not left      # none before: a new buffer
    spare.fill_(-1.0)
    assert ef.swap("w", spare) is left and ef.get("w") is spare                    # the old one comes back
    assert torch.equal(ef.get("w"), torch.full((3,), -1.0))
    off = ErrorFeedback(enabled=False)
    assert off.swap("w", left) is left and off.get("w") is None


def test_add_puts_mass_back_in_place_and_norms_stay_on_the_device():
    ef = ErrorFeedback()
    ef.add("w", torch.full((2,), 3.0))                     # none before: a copy
    e = ef.get("w")
    ef.add("w", torch.full((2,), 1.0))
    assert ef.get("w") is e and torch.equal(e, torch.full((2,), 4.0))
    ef.swap("b", torch.tensor([0.0, 3.0]))
    assert [float(n) for n in ef.norms()] == pytest.approx([32 ** 0.5, 3.0])
    assert ef.norm() == pytest.approx(41 ** 0.5)
    off = ErrorFeedback(enabled=False)
    off.add("w", torch.ones(2))
    assert off.get("w") is None and off.norms() == []
