"""Answer extraction, choice labels and math equivalence (against math-verify on a hand-written table)."""
import pytest

from spark_megatron.verify import choice_label, extract_boxed, ground_truth_choice, is_correct, normalize_answer

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed {x^{2}+1}", "x^{2}+1"),
    (r"\box{7}", "7"),
    (r"first \boxed{1} then \boxed{2}", "1"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\begin{pmatrix}1&2\\3&4\end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"),
    (r"\boxed{a_{b_{c}}} and more}", "a_{b_{c}}"),
    (r"put it in \boxed{} ... \boxed{5}", "5"),
    (r"\boxed{  3  }", "3"),
    (r"\boxed{\boxed{9}}", r"\boxed{9}"),
    (r"\boxed{1", None),
    (r"\boxed{\frac{1}{2}", None),
    ("no box here: 42", None),
    (r"\fbox{3}", None),
    ("", None),
    (None, None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "Yes"), ("yes.", "Yes"), ("YES!", "Yes"), (r"\text{No}", "No"), ("no", "No"), ("**No**", "No"),
    ("Yes, it is correct", "Yes"), ("A", "A"), ("(B)", "B"), ("(B) 102", "B"), ("B. 102", "B"), ("b", "B"),
    ("Option C", "C"), ("Answer: D", "D"), ("c)", "C"), (r"\text{(A)}", "A"),
    ("Both", None), ("Noted", None), ("yesterday", None), ("102", None), ("", None), (None, None), ("K", None),
])
def test_choice_label(text, expected):
    assert choice_label(text) == expected


@pytest.mark.parametrize("gt, expected", [
    ("Yes", "Yes"), ("no", "No"), ("A", "A"), ("(C)", "C"), ("(B) 102", "B"),
    ("a", None), ("x", None), ("12", None), ("A+B", None), ("Apple", None),
])
def test_ground_truth_choice(gt, expected):
    assert ground_truth_choice(gt) == expected


def test_normalize_answer():
    assert normalize_answer(r" \left( 1, 2 \right) ") == "(1,2)"
    assert normalize_answer(r"\text{East}.") == "east"
    assert normalize_answer(r"\dfrac{1}{2}") == r"\frac{1}{2}"
    assert normalize_answer(r"30^{\circ}") == "30"


# (prediction, ground truth, expected verdict (by hand), math_verify's own verdict on the same pair).
# Where the two differ, our rule is deliberate: choice labels, case-insensitive words, anagram-proof words.
TABLE = [
    # fractions
    ("1/2", r"\frac{1}{2}", True, True),
    ("0.5", r"\frac12", True, True),
    (r"\dfrac{3}{4}", "0.75", True, True),
    (r"\frac{2}{4}", r"\frac{1}{2}", True, True),
    (r"\frac{1}{3}", "0.33", False, False),
    (r"\frac{1}{3}", "0.333333", True, True),
    ("3/2", "1.5", True, True),
    (r"-\frac{1}{2}", "-0.5", True, True),
    (r"\frac{1}{2}", "-0.5", False, False),
    (r"\frac{7}{3}", r"2\frac{1}{3}", True, True),
    # decimals and integers
    ("3.0", "3", True, True),
    ("3.01", "3", False, False),
    ("1,000", "1000", True, True),
    ("1000", "10^3", True, True),
    (r"2.5\times 10^{3}", "2500", True, True),
    ("0.1", ".1", True, True),
    ("12", "21", False, False),
    ("0.50", r"\frac{1}{2}", True, True),
    # radicals and constants
    (r"2\sqrt{2}", r"\sqrt{8}", True, True),
    (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}", True, True),
    (r"\pi", "3.14159", False, False),
    (r"2\pi", r"\pi \cdot 2", True, True),
    (r"\sqrt{3}", r"\sqrt{2}", False, False),
    # algebra and equations
    ("x^2+2x+1", "(x+1)^2", True, True),
    ("x^2-1", "(x-1)(x+1)", True, True),
    ("2x", "x+x", True, True),
    ("x+1", "x-1", False, False),
    ("x=3", "3", True, True),
    ("y=2x+1", "y=1+2x", True, True),
    # intervals, sets, tuples
    ("[1,2)", "[1,2)", True, True),
    ("(1,2)", "[1,2]", False, False),
    (r"(-\infty, 3]", r"(-\infty,3]", True, True),
    (r"\{1,2\}", r"\{2,1\}", True, True),
    ("(1,2)", "(2,1)", False, False),
    (r"[0,\infty)", r"[0,+\infty)", True, True),
    (r"x \in [1,2]", "[1,2]", True, True),
    # matrices and vectors
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True, True),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\4&3\end{pmatrix}", False, False),
    (r"\begin{bmatrix}1\\0\end{bmatrix}", r"\begin{pmatrix}1\\0\end{pmatrix}", True, True),
    # units, degrees, percent
    (r"5\text{ cm}", "5", True, True),
    ("5", r"5\text{ cm}", True, True),
    ("5 apples", "5", True, True),
    (r"30^\circ", "30", True, True),
    (r"30^{\circ}", r"\frac{\pi}{6}", False, False),
    (r"10\%", "10", True, True),
    (r"45\%", "0.45", True, True),
    ("6", r"7\text{ m}", False, False),
    # text answers
    ("east", r"\text{East}", True, True),
    ("East", "east", True, False),
    ("seat", "east", False, True),          # sympy: e*a*s*t == s*e*a*t
    ("red", "blue", False, False),
    ("triangle", "Triangle.", True, False),
    (r"\text{parallelogram}", "parallelogram", True, True),
    # choice letters and Yes/No
    ("B", "B", True, True),
    ("(B) 102", "B", True, False),
    ("b", "B", True, True),
    ("A", "B", False, False),
    ("Option C", "C", True, False),
    ("(D)", "D", True, True),
    ("yes.", "Yes", True, False),
    (r"\text{No}", "No", True, True),
    ("Yes", "No", False, False),
    ("YES", "yes", True, False),
    # empty and malformed
    ("", "3", False, False),
    ("abc{", "3", False, False),
]


def test_table_is_large_enough():
    assert len(TABLE) >= 50


@pytest.mark.parametrize("pred, gt, expected, mv_expected", TABLE)
def test_equivalence_table(pred, gt, expected, mv_expected):
    from math_verify import parse, verify

    assert is_correct(pred, gt) is expected
    assert verify(parse("\\boxed{" + gt + "}"), parse("\\boxed{" + pred + "}")) is mv_expected


def test_is_correct_accepts_a_full_response():
    assert is_correct(r"The sum is \boxed{7}.", "7")
    assert not is_correct(r"The sum is \boxed{8}.", "7")
    assert not is_correct(None, "7")
    assert not is_correct("7", "  ")
    assert is_correct(r"\frac{13}{2}", "6.5.") and is_correct("6.", r"\frac{12}{2}")  # a full stop in the box


def test_in_process_timeout_cuts_off_a_pathological_answer():
    import time

    t0 = time.monotonic()
    assert not is_correct(r"9^{9^{9^{9^{9}}}}", "10^{3}", timeout_s=0.5)
    assert time.monotonic() - t0 < 30  # 0.5 CPU s; generous for a crowded machine
