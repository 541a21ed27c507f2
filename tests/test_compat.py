"""Every private PyTorch interface ISOPO uses still exists and behaves as relied on.

A failure here names the interface a PyTorch release changed; ``torch_isopo/_compat.py`` says
what each is for.
"""
import torch

from torch_isopo import _compat
from torch_isopo.gate import Gate


def test_graph_task_id_tells_backward_passes_apart():
    seen = []
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(_compat.graph_task_id()))
    assert _compat.graph_task_id() == -1, "torch._C._current_graph_task_id outside a backward"
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    assert len(seen) == 2 and seen[0] >= 0 and seen[0] != seen[1], (
        "torch._C._current_graph_task_id no longer identifies the running backward")


def test_autograd_node_is_the_running_node():
    found = []
    x = torch.randn(3, requires_grad=True)
    y = x.exp()
    y.register_hook(lambda g: found.append(_compat.autograd_node()))
    assert _compat.autograd_node() is None
    y.sum().backward()
    assert found and found[0] is not None and hasattr(found[0], "next_functions"), (
        "torch._C._current_autograd_node no longer returns the running autograd node")


def test_node_type_recognises_a_functions_nodes():
    x = torch.randn(2, requires_grad=True)
    y, = Gate.apply(None, x)
    assert isinstance(y.grad_fn, _compat.node_type(Gate)), (
        "Function._backward_cls is no longer the class of a custom Function's graph nodes")


def test_optimizer_hook_registries():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for kind, register in [("state_dict_pre", opt.register_state_dict_pre_hook),
                           ("state_dict_post", opt.register_state_dict_post_hook),
                           ("load_state_dict_pre", opt.register_load_state_dict_pre_hook),
                           ("load_state_dict_post", opt.register_load_state_dict_post_hook)]:
        hook = lambda *a: None  # noqa: E731
        register(hook)
        assert _compat.optimizer_hooks(opt, kind) == [hook], (
            f"torch.optim.Optimizer no longer keeps {kind} hooks in _optimizer_{kind}_hooks")


def test_swapped_parameters_and_pytree():
    lin = torch.nn.Linear(2, 2)
    w = torch.ones(2, 2)
    with _compat.swapped_parameters([(lin, "weight")], [w]):
        assert lin.weight is w, "module._parameters no longer backs module attributes"
    assert isinstance(lin.weight, torch.nn.Parameter)
    leaves, spec = _compat.tree_flatten(((1, torch.ones(1)), {"k": torch.zeros(2)}))
    assert len(leaves) == 3 and _compat.tree_unflatten(leaves, spec)[1]["k"].shape == (2,)


def test_forward_pre_hooks_are_listed():
    lin = torch.nn.Linear(2, 2)
    hook = lambda m, a: None  # noqa: E731
    lin.register_forward_pre_hook(hook)
    assert _compat.forward_pre_hooks(lin) == [hook], (
        "nn.Module no longer keeps forward pre-hooks in _forward_pre_hooks")


def test_a_function_mode_steps_aside():
    from torch.overrides import TorchFunctionMode
    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))
    with Mode() as mode:
        assert _compat.top_function_mode() is mode, "no longer the innermost mode"
        with _compat.without_function_mode():
            torch.ones(2) + 1
        assert _compat.top_function_mode() is mode, "the mode is back after stepping aside"
    assert not seen, "torch.overrides._pop_mode_temporarily no longer removes the top mode"


def test_eager_compiled_runs_compiled_code_eagerly():
    calls = []

    def f(x):
        calls.append(1)                   # Python runs at every call only when eager
        return x * 2

    g = torch.compile(f)
    with _compat.eager_compiled():
        g(torch.ones(2))
        g(torch.ones(2))
    assert len(calls) == 2 or not hasattr(torch.compiler, "set_stance"), (
        "torch.compiler.set_stance('force_eager') no longer runs compiled code eagerly")


def test_lean_function_applies_and_backpropagates_as_function_apply():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.k = k
            return x * k

        @staticmethod
        def backward(ctx, g):
            return g * ctx.k, None

    _compat.lean_function(Scale)
    x = torch.randn(3, requires_grad=True)
    y = Scale.apply(x, 2.5)
    assert isinstance(y.grad_fn, _compat.node_type(Scale)), "custom Function nodes changed"
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.5)), (
        "torch.autograd.Function's C apply (_FunctionBase.apply) or its backward node's apply "
        "no longer run a Function as Function.apply does")


def test_run_eagerly_runs_the_function_eagerly_and_under_compile():
    calls = []

    @_compat.run_eagerly
    def f(x):
        calls.append(torch.compiler.is_compiling())
        return x + 1

    assert f(torch.ones(1)).item() == 2
    g = torch.compile(lambda x: f(x) * 2, backend="eager")
    assert g(torch.ones(1)).item() == 4
    assert calls == [False, False], "torch.compiler.disable no longer runs its function eagerly"
