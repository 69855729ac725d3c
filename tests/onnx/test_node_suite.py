"""ONNX's node-test suite through kfuse: every case of `onnx.backend.test.case.node.collect_testcases()`
compiled from its model file with `kfuse.compile(path, inputs)`, called, and compared with the case's
expected outputs at the case's own rtol/atol (node_cases.py says how, and how a float16 output may
differ by its reference's own rounding).

A case fails the test when kfuse
- returns a wrong result (another shape or dtype, or values outside the tolerance),
- crashes (raises anything that is not a kfuse.KfuseError),
- gives a clear KfuseError that is not listed in expected_errors.txt (a case that passed before
  must not silently turn into an error), or
- passes although expected_errors.txt lists it (remove the line: the list stays honest).
`python -m tests.onnx.report` prints the counts; docs/ONNX.md has the numbers.
"""
import pytest

import node_cases

pytest.importorskip("onnx.backend.test.case.node")

CASES = sorted(node_cases.cases())
EXPECTED = node_cases.expected_errors()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("node_suite")


@pytest.mark.parametrize("name", CASES)
def test_node_case(name, workdir):
    out = node_cases.run_kfuse(node_cases.cases()[name], workdir)
    if out.status == "pass":
        if name in EXPECTED:
            pytest.fail(f"{name} passes now, but tests/onnx/expected_errors.txt lists it as a clear error "
                        f"({EXPECTED[name]}): remove its line from expected_errors.txt")
    elif out.status == "error":
        if name not in EXPECTED:
            pytest.fail(f"{name}: a clear error not in tests/onnx/expected_errors.txt: {out.detail}\n"
                        "If this case passed before, that is a regression; if the error is right, add the line "
                        f"`{name}  <reason>` to expected_errors.txt")
    elif out.status == "wrong":
        pytest.fail(f"{name}: WRONG RESULT: {out.detail}")
    else:
        pytest.fail(f"{name}: crash (an exception that is not a KfuseError): {out.detail}")


def test_expected_errors_name_real_cases():
    """Every line of expected_errors.txt names a case of the suite, once, with a reason."""
    lines = [line.split() for line in node_cases.EXPECTED_ERRORS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    names = [parts[0] for parts in lines]
    assert len(names) == len(set(names)), "a case is listed twice"
    unknown = sorted(set(names) - set(CASES))
    assert not unknown, f"expected_errors.txt lists cases the suite does not have: {unknown[:10]}"
    bare = [parts[0] for parts in lines if len(parts) < 2]
    assert not bare, f"lines without a reason: {bare[:10]}"
