"""The token ring (moeflow.infer.token_ring): the argmax kernel publishing each step's greedy
tokens with its tag into the next slot, the seq it advances, the tickets it leaves at 0; the
host's read waiting for its own step's tag, refusing a reused slot and a step that never
published, and resync after steps it did not count. Under Triton's interpreter on the CPU (the
ring an ordinary tensor there); on a GPU in pinned memory."""

import threading
import time

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.infer import token_ring  # noqa: E402
from moeflow.infer.token_ring import SLOTS, TAG_MOD, TokenRing, tag_of  # noqa: E402
from moeflow.ops.argmax_triton import argmax_rows_triton  # noqa: E402


def _logits(step: int, B: int = 3, V: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(B, V, generator=g).to(DEVICE)


def test_each_launch_publishes_its_tokens_into_the_next_slot():
    """More launches than slots: each step's tokens are read back under its own seq, the seq
    advances once a launch (not once a row), rows past B are left alone, and every ticket
    (the rows' and the one across rows) is back at 0 for the next launch."""
    ring = TokenRing(5, DEVICE)
    B = 3
    tickets = torch.zeros(B + 1, dtype=torch.int32, device=DEVICE)
    for step in range(SLOTS + 3):
        x = _logits(step, B)
        out = argmax_rows_triton(x, tickets, ring=ring)
        index = ring.issued()
        assert index == step and int(ring.seq_1) == step + 1
        expected = x.argmax(dim=-1)
        assert torch.equal(out, expected)
        assert ring.read(index, B) == expected.tolist()
        assert ring.read(index, 2) == expected.tolist()[:2]
        assert not tickets.any()
    assert not ring.words_RN[:, B:].any()
    words = ring.words_RN[(SLOTS + 2) % SLOTS, :B].tolist()
    assert [w >> 32 for w in words] == [tag_of(SLOTS + 2)] * B


def test_read_waits_for_its_own_step_while_the_device_is_busy():
    """The host reads a step before the device has written it (the slot still holds an older
    step's words): read keeps polling until the words carry its tag, then returns them."""
    class Busy(TokenRing):
        def __init__(self) -> None:
            super().__init__(4, "cpu")
            self.done = threading.Event()

        def _idle(self) -> bool:
            return self.done.is_set()

    ring = Busy()
    ring.words_RN[0, :2] = torch.tensor([(tag_of(0) << 32) | 7] * 2)  # step 0, read earlier
    late = [(tag_of(SLOTS) << 32) | 11, (tag_of(SLOTS) << 32) | 12]

    def device() -> None:
        time.sleep(0.05)
        ring.words_RN[0, 0] = late[0]
        time.sleep(0.02)  # one row written, the other not yet: read must not stop here
        ring.words_RN[0, 1] = late[1]
        ring.done.set()

    writer = threading.Thread(target=device)
    writer.start()
    try:
        assert ring.read(SLOTS, 2) == [11, 12]
    finally:
        writer.join()


def test_a_step_that_never_publishes_is_an_error_not_a_hang():
    ring = TokenRing(2, "cpu")  # on the CPU the "device" is always idle
    with pytest.raises(RuntimeError, match="step 0's tokens never arrived"):
        ring.read(0, 2)


def test_a_slot_reused_before_its_read_is_an_error_not_another_steps_tokens():
    ring = TokenRing(2, DEVICE)
    tickets = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    for step in range(SLOTS + 1):
        argmax_rows_triton(_logits(step, 2), tickets, ring=ring)
    with pytest.raises(RuntimeError, match="step 0's slot was reused"):
        ring.read(0, 2)
    assert ring.read(SLOTS, 2) == _logits(SLOTS, 2).argmax(dim=-1).tolist()


def test_resync_takes_the_steps_the_host_did_not_count():
    """Warm-up runs publish too: after them the host's count is the device's."""
    ring = TokenRing(2, DEVICE)
    tickets = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    for step in range(3):
        argmax_rows_triton(_logits(step, 2), tickets, ring=ring)
    ring.resync()
    x = _logits(9, 2)
    argmax_rows_triton(x, tickets, ring=ring)
    index = ring.issued()
    assert index == 3
    assert ring.read(index, 2) == x.argmax(dim=-1).tolist()


def test_tags_wrap_and_stay_ordered():
    assert tag_of(0) == 1 and tag_of(TAG_MOD - 1) == TAG_MOD and tag_of(TAG_MOD) == 1
    assert token_ring._newer(tag_of(TAG_MOD), tag_of(TAG_MOD - 1))  # across the wrap
    assert not token_ring._newer(tag_of(TAG_MOD - 1), tag_of(TAG_MOD))
    assert not token_ring._newer(0, 5)  # a zeroed word is no step's


def test_refuses_a_ring_or_tickets_that_cannot_hold_the_step():
    x = _logits(0, 3)
    with pytest.raises(ValueError, match="token ring must hold 3 rows"):
        argmax_rows_triton(x, ring=TokenRing(2, DEVICE))
    with pytest.raises(ValueError, match="tickets must be int32 zeros, at least 4"):
        argmax_rows_triton(x, torch.zeros(3, dtype=torch.int32, device=DEVICE),
                           ring=TokenRing(3, DEVICE))
    with pytest.raises(ValueError, match="token ring: 3 rows, the ring holds 2"):
        TokenRing(2, DEVICE).read(0, 3)


def test_the_host_reads_a_decode_steps_own_greedy_tokens_from_the_ring_only():
    """NextTokens.record: tokens the step wrote in place with a published seq are read from the
    ring (here a word put there by hand, so the ring is seen to be what is read); tokens drawn
    apart (rows that sample: another tensor) are copied, published or not."""
    from moeflow.infer.next_tokens import NextTokens

    nt = NextTokens(4, DEVICE, ring=True)
    tickets = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    x = _logits(3, 2)
    argmax_rows_triton(x, tickets, out=nt.ids[:2], ring=nt.ring)
    index = nt.ring.issued()
    assert nt.record(0, nt.ids[:2], [], index).read() == x.argmax(dim=-1).tolist()
    nt.ring.words_RN[index % SLOTS, 1] = (tag_of(index) << 32) | 1234
    assert nt.record(0, nt.ids[:2], [], index).read() == [x.argmax(dim=-1)[0].item(), 1234]
    drawn = torch.tensor([5, 6], device=DEVICE)
    assert nt.record(0, drawn, [], index).read() == [5, 6]
    assert nt.ids[:2].tolist() == [5, 6]  # the next step's inputs
    assert nt.record(0, nt.ids[:2], []).read() == [5, 6]  # nothing published: copied


@pytest.mark.skipif(ON_GPU, reason="the engine's bookkeeping with the interpreter's argmax")
def test_the_engine_reads_its_greedy_decode_steps_from_the_ring(monkeypatch):
    """The engine's bookkeeping, on the CPU with the Triton argmax under the interpreter in the
    GPU's place: an engine whose decode steps publish into a token ring emits the tokens of one
    that copies them, one step at a time and pipelined, through a batch that changes (requests
    join and finish) and has a sampled row for a while (those steps copy), with more steps than
    the ring has slots run outside the engine under held_state while a step is in flight (the
    ring is put back as it was, that step's words included). Each all-greedy decode step is
    read from the ring, in launch order, and every step is counted once."""
    from moeflow.infer import sampling
    from moeflow.infer.engine import Engine, EngineConfig
    from moeflow.infer.next_tokens import NextTokens
    from moeflow.infer.sampling import SamplingParams

    from tests.test_engine import make_model, prompts

    def run(engine, ps, params, hold_at=-1):
        ids = [engine.add_request(p, q) for p, q in zip(ps, params)]
        out = {i: [] for i in ids}
        steps = 0
        while engine.has_work():
            for event in engine.step():
                out[event.request_id].append(event.token_id)
            steps += 1
            if steps == hold_at:
                assert engine._in_flight is not None or not engine._pipelined
                dec = engine._decoder
                with dec.held_state(), torch.no_grad():
                    for _ in range(SLOTS + 2):
                        dec.step_fn(*dec._args(*dec.last_key))
        return [out[i] for i in ids]

    monkeypatch.setattr(sampling, "_use_kernel", lambda logits: True)
    model = make_model("llama")
    ps = prompts(5, seed=3)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (6, 9, 4, 7, 5)]
    params[3] = SamplingParams(max_new_tokens=3, temperature=0.9, seed=1)
    for pipelined in (False, True):
        config = EngineConfig(max_batch_size=3, pipelined_decode=pipelined)
        copied = Engine(model, config)
        assert copied.next_tokens.ring is None  # the CPU's default
        want = run(copied, ps, params)
        engine = Engine(model, config)
        engine.next_tokens = NextTokens(3, engine.device, ring=True)
        engine._decoder = engine._graph_decoder(capture=False)
        ring = engine.next_tokens.ring
        reads = []
        read = ring.read
        monkeypatch.setattr(ring, "read", lambda i, n: reads.append(i) or read(i, n))
        assert run(engine, ps, params, hold_at=4) == want
        assert len(reads) >= 5 and reads == sorted(set(reads))
        assert ring.issued() == int(ring.seq_1)
