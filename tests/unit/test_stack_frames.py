"""Which frames name a stack: torch's memory_viz filter, then the Python frames or the ATen operators."""

from __future__ import annotations

from analyzers.stack_frames import heading, kept_frames


def test_unwinder_interpreter_and_dispatcher_frames_are_left_out() -> None:
    stack = "\n".join(
        [
            "??:0:torch::unwind::unwind()",
            "memory_snapshot.cpp:0:torch::cuda::(anonymous namespace)::gather_with_cpp()",
            "CUDACachingAllocator.cpp:0:c10::cuda::CUDACachingAllocator::Native::DeviceCachingAllocator::malloc()",
            "/pytorch/aten/src/ATen/core/boxing/impl/boxing.h:41:call",
            "??:0:at::_ops::exp::call(at::Tensor const&)",
            "/usr/src/python-3.12/Objects/call.c:240:_PyObject_MakeTpCall",
            "D:\\Dev\\x\\train.py:7:custom_softmax",
            "/usr/src/python-3.12/Python/ceval.c:578:PyEval_EvalCode",
            "??:0:_start",
        ]
    )
    kept = kept_frames(stack)
    assert kept == [
        "CUDACachingAllocator.cpp:0:c10::cuda::CUDACachingAllocator::Native::DeviceCachingAllocator::malloc()",
        "??:0:at::_ops::exp::call(at::Tensor const&)",
        "D:\\Dev\\x\\train.py:7:custom_softmax",
    ]
    assert heading(kept) == ["D:\\Dev\\x\\train.py:7:custom_softmax"]
    assert heading(kept[:2]) == ["??:0:at::_ops::exp::call(at::Tensor const&)"]


def test_a_stack_is_never_left_empty() -> None:
    assert kept_frames("??:0:torch::unwind::unwind()") == ["??:0:torch::unwind::unwind()"]
    assert heading(["a.cpp:1:f", "b.cpp:2:g"]) == ["a.cpp:1:f", "b.cpp:2:g"]
