r"""Our phrasings of the judgment tasks (pointwise Yes/No, pointwise A/B, pairwise); see templates.py."""

POINTWISE_YES_NO_TEXT = [
    r"""Question:
$question

Proposed $what:
$response

Is the proposed $what correct? Answer Yes or No and put your verdict in \boxed{}.""",
    r"""You are grading a student's work. The problem is:
$question

The student's $what:
$response

Decide whether the $what is right. Put Yes or No in \boxed{}.""",
    r"""Check the following $what to the problem below.

Problem: $question

$What under review:
$response

Is it correct? Reply with Yes or No inside \boxed{}.""",
    r"""Here is a math problem and a candidate $what.

[Problem]
$question

[Candidate $what]
$response

Verify the candidate carefully. Does it reach the right final result? Respond with Yes or No in \boxed{}.""",
    r"""$question

Someone proposed the following $what to this question:
$response

Think about whether it is correct, then give your judgment (Yes or No) in \boxed{}.""",
    r"""Evaluate the correctness of the $what below.

Question: $question
$What: $response

If the final result is correct the verdict is Yes, otherwise No. State the verdict in \boxed{}.""",
    r"""Act as a strict reviewer. Read the question and the proposed $what, work out whether the $what is correct, and report Yes or No.

Question:
$question

Proposed $what:
$response

Put Yes or No in \boxed{}.""",
    r"""Problem statement:
$question

Submitted $what:
$response

Is the submitted $what correct? Solve the problem yourself if needed, and finish with Yes or No in \boxed{}.""",
    r"""Below is a question followed by an attempted $what.

$question

Attempted $what:
$response

Would a careful grader mark this $what as correct? Give Yes or No inside \boxed{}.""",
    r"""Determine whether the $what given for this problem is right.
Problem: $question
Given $what: $response
Conclude with Yes (it is right) or No (it is wrong) written inside \boxed{}.""",
]

POINTWISE_YES_NO_IMAGE = [
    r"""Look at the image and read the question.

Question:
$question

Proposed $what:
$response

Based on the image, is the proposed $what correct? Answer Yes or No and put your verdict in \boxed{}.""",
    r"""You are grading a student's work on a question about the image.

Question: $question

The student's $what:
$response

Use what the image shows to decide whether the $what is right. Put Yes or No in \boxed{}.""",
    r"""The image comes with this problem:
$question

$What under review:
$response

Check it against the image. Is it correct? Reply with Yes or No inside \boxed{}.""",
    r"""Here is a problem about the picture and a candidate $what.

[Problem]
$question

[Candidate $what]
$response

Examine the image and verify the candidate. Respond with Yes or No in \boxed{}.""",
    r"""$question

After looking at the image, someone proposed this $what:
$response

Inspect the image yourself and decide whether it is correct; give Yes or No in \boxed{}.""",
    r"""Evaluate the $what below to a question about the image.

Question: $question
$What: $response

If it agrees with the image and the final result is correct the verdict is Yes, otherwise No. State the verdict in \boxed{}.""",
    r"""Act as a strict reviewer. Study the image, read the question and the proposed $what, and report whether the $what is correct.

Question:
$question

Proposed $what:
$response

Put Yes or No in \boxed{}.""",
    r"""Problem (refer to the image):
$question

Submitted $what:
$response

Is the submitted $what correct for the figure shown? Finish with Yes or No in \boxed{}.""",
    r"""The image and the question below were given to a model, which replied with the $what that follows.

$question

Model's $what:
$response

Would a careful grader who can see the image mark it correct? Give Yes or No inside \boxed{}.""",
    r"""Using the visual information in the image, determine whether the given $what is right.
Problem: $question
Given $what: $response
Conclude with Yes (it is right) or No (it is wrong) written inside \boxed{}.""",
]

POINTWISE_AB_TEXT = [
    r"""Question:
$question

Proposed $what:
$response

Which statement holds?
(A) The $what is correct.
(B) The $what is incorrect.
Put the letter of your choice in \boxed{}.""",
    r"""Grade the $what to the problem below.

Problem: $question
$What: $response

Options: (A) correct, (B) incorrect. Write A or B inside \boxed{}.""",
    r"""$question

A candidate $what is:
$response

Is this $what (A) right or (B) wrong? Give the letter in \boxed{}.""",
    r"""Review this work.

[Problem]
$question

[$What]
$response

Choose one: (A) the final result is correct; (B) the final result is not correct. Answer with \boxed{} containing A or B.""",
    r"""Here is a problem with a proposed $what.
Problem: $question
Proposed $what: $response

Select (A) if the $what is correct and (B) if it contains an error in the final result. Put A or B in \boxed{}.""",
    r"""You are an examiner. Read the question and the submitted $what.

Question:
$question

Submitted $what:
$response

Verdict options:
(A) correct
(B) incorrect
Report the option letter in \boxed{}.""",
    r"""Decide about the following $what.

$question

$What to assess: $response

(A) It solves the problem correctly. (B) It does not. Respond with the letter inside \boxed{}.""",
    r"""Problem:
$question

Attempted $what:
$response

Classify the attempt as (A) correct or (B) incorrect, and put the letter in \boxed{}.""",
    r"""Consider the question and the $what that was given for it.
Question: $question
$What given: $response
Pick (A) for a correct $what or (B) for a wrong one. Place your letter in \boxed{}.""",
    r"""Check the following carefully.

Task: $question

Response under review:
$response

Is the response's final result (A) correct or (B) incorrect? Finish with A or B in \boxed{}.""",
]

POINTWISE_AB_IMAGE = [
    r"""Look at the image and the question.

Question:
$question

Proposed $what:
$response

Which statement holds?
(A) The $what is correct.
(B) The $what is incorrect.
Put the letter of your choice in \boxed{}.""",
    r"""Grade the $what to this question about the image.

Question: $question
$What: $response

Options: (A) correct, (B) incorrect. Write A or B inside \boxed{}.""",
    r"""$question

Having seen the image, someone answered with this $what:
$response

Is this $what (A) right or (B) wrong? Give the letter in \boxed{}.""",
    r"""Review this work on the image.

[Problem]
$question

[$What]
$response

Choose one: (A) the final result is correct; (B) the final result is not correct. Answer with \boxed{} containing A or B.""",
    r"""Here is a question about the figure, with a proposed $what.
Question: $question
Proposed $what: $response

Use the image to select (A) if the $what is correct and (B) if it is not. Put A or B in \boxed{}.""",
    r"""You are an examiner. Study the image, then read the question and the submitted $what.

Question:
$question

Submitted $what:
$response

Verdict options:
(A) correct
(B) incorrect
Report the option letter in \boxed{}.""",
    r"""Decide about the following $what, using what the image shows.

$question

$What to assess: $response

(A) It solves the problem correctly. (B) It does not. Respond with the letter inside \boxed{}.""",
    r"""Problem (see the image):
$question

Attempted $what:
$response

Classify the attempt as (A) correct or (B) incorrect, and put the letter in \boxed{}.""",
    r"""Consider the image, the question and the $what that was given for it.
Question: $question
$What given: $response
Pick (A) for a correct $what or (B) for a wrong one. Place your letter in \boxed{}.""",
    r"""Check the following carefully against the image.

Task: $question

Response under review:
$response

Is the response's final result (A) correct or (B) incorrect? Finish with A or B in \boxed{}.""",
]

PAIRWISE_TEXT = [
    r"""Question:
$question

Two candidate $whats are given; exactly one of them is correct.
(A) $response_a
(B) $response_b

Which one is correct? Put A or B in \boxed{}.""",
    r"""Compare the two $whats to the problem below and pick the correct one.

Problem: $question

[A]
$response_a

[B]
$response_b

Write the letter of the correct $what inside \boxed{}.""",
    r"""$question

Candidate (A):
$response_a

Candidate (B):
$response_b

One candidate reaches the right result and one does not. Identify the right one and give its letter in \boxed{}.""",
    r"""Two students submitted different $whats to the same question.

Question: $question
Student A: $response_a
Student B: $response_b

Which student is correct? Respond with A or B in \boxed{}.""",
    r"""Read the problem and both $whats carefully.

[Problem]
$question

[$What A]
$response_a

[$What B]
$response_b

Decide which $what is correct and put its letter in \boxed{}.""",
    r"""Problem:
$question

Option (A): $response_a
Option (B): $response_b

Only one option is right. Which? Answer with the letter inside \boxed{}.""",
    r"""You are judging a pair of $whats. Exactly one is correct.

Question:
$question

First $what (A):
$response_a

Second $what (B):
$response_b

Put the letter of the correct $what in \boxed{}.""",
    r"""Here is a question and two possible $whats.
Question: $question
(A) $response_a
(B) $response_b
Work out which $what is right, then write A or B in \boxed{}.""",
    r"""Evaluate both attempts at this problem.

$question

Attempt A:
$response_a

Attempt B:
$response_b

Which attempt has the correct final result? Give A or B inside \boxed{}.""",
    r"""Select the correct $what.

Task: $question

(A)
$response_a

(B)
$response_b

Reply with \boxed{} containing the letter of the correct one.""",
]

PAIRWISE_IMAGE = [
    r"""Look at the image and read the question.

Question:
$question

Two candidate $whats are given; exactly one of them is correct.
(A) $response_a
(B) $response_b

Which one is correct? Put A or B in \boxed{}.""",
    r"""Compare the two $whats to this question about the image and pick the correct one.

Question: $question

[A]
$response_a

[B]
$response_b

Write the letter of the correct $what inside \boxed{}.""",
    r"""$question

Candidate (A):
$response_a

Candidate (B):
$response_b

Using the image, decide which candidate reaches the right result and give its letter in \boxed{}.""",
    r"""Two students looked at the image and submitted different $whats.

Question: $question
Student A: $response_a
Student B: $response_b

Which student is correct? Respond with A or B in \boxed{}.""",
    r"""Study the image, then read the problem and both $whats.

[Problem]
$question

[$What A]
$response_a

[$What B]
$response_b

Decide which $what is correct and put its letter in \boxed{}.""",
    r"""Problem (refer to the image):
$question

Option (A): $response_a
Option (B): $response_b

Only one option is right. Which? Answer with the letter inside \boxed{}.""",
    r"""You are judging a pair of $whats to a question about the picture. Exactly one is correct.

Question:
$question

First $what (A):
$response_a

Second $what (B):
$response_b

Put the letter of the correct $what in \boxed{}.""",
    r"""Here is a question about the image and two possible $whats.
Question: $question
(A) $response_a
(B) $response_b
Check them against the image, then write A or B in \boxed{}.""",
    r"""Evaluate both attempts at this visual problem.

$question

Attempt A:
$response_a

Attempt B:
$response_b

Which attempt matches what the image shows and has the correct final result? Give A or B inside \boxed{}.""",
    r"""Select the correct $what for the figure.

Task: $question

(A)
$response_a

(B)
$response_b

Reply with \boxed{} containing the letter of the correct one.""",
]
