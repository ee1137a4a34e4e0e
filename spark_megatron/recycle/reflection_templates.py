r"""Our phrasings of the reflection task and of the test-time retry prompt; see templates.py."""

REFLECTION_TEXT = [
    r"""Question:
$question

An earlier $what was:
$response

Check this $what for mistakes and solve the problem correctly. Put the final answer in \boxed{}.""",
    r"""Here is a problem and an attempted $what that may be wrong.

Problem: $question

Attempted $what:
$response

Find any error, fix it, and give the correct final answer in \boxed{}.""",
    r"""$question

A previous attempt gave:
$response

Review the attempt critically, then work out the right result and write it inside \boxed{}.""",
    r"""Someone tried to solve the following problem.

[Problem]
$question

[Their $what]
$response

Verify their reasoning, correct it if needed, and state the final answer in \boxed{}.""",
    r"""Problem statement:
$question

Draft $what:
$response

The draft may contain errors. Re-derive the answer carefully and put it in \boxed{}.""",
    r"""Reflect on the $what below and make sure the final result is right.

Question: $question
$What: $response

Give your own corrected final answer in \boxed{}.""",
    r"""You are reviewing a student's work.

Question:
$question

Student's $what:
$response

Point out what, if anything, went wrong and provide the correct answer inside \boxed{}.""",
    r"""Consider this question and a proposed $what.
$question

Proposed $what: $response

Double-check every step, solve the problem again, and present the final answer in \boxed{}.""",
    r"""Task: $question

Previous $what:
$response

Do not trust the previous $what. Solve the task from scratch and write the final answer in \boxed{}.""",
    r"""Below is a question with a $what that needs checking.

$question

$What to check:
$response

Work through the problem yourself and give the correct final answer inside \boxed{}.""",
]

REFLECTION_IMAGE = [
    r"""Look at the image and read the question.

Question:
$question

An earlier $what was:
$response

Check this $what against the image and solve the problem correctly. Put the final answer in \boxed{}.""",
    r"""Here is a question about the image and an attempted $what that may be wrong.

Question: $question

Attempted $what:
$response

Find any error, using what the image shows, and give the correct final answer in \boxed{}.""",
    r"""$question

A previous attempt, made after looking at the image, gave:
$response

Review it critically, look at the image again, and write the right result inside \boxed{}.""",
    r"""Someone tried to solve the following problem about the picture.

[Problem]
$question

[Their $what]
$response

Verify their reading of the image and their reasoning, correct them if needed, and state the final answer in \boxed{}.""",
    r"""Problem (see the image):
$question

Draft $what:
$response

The draft may misread the image or contain errors. Re-derive the answer carefully and put it in \boxed{}.""",
    r"""Reflect on the $what below to a question about the image and make sure the final result is right.

Question: $question
$What: $response

Give your own corrected final answer in \boxed{}.""",
    r"""You are reviewing a student's work on the image.

Question:
$question

Student's $what:
$response

Point out what, if anything, went wrong and provide the correct answer inside \boxed{}.""",
    r"""Consider the image, this question and a proposed $what.
$question

Proposed $what: $response

Re-examine the image, solve the problem again, and present the final answer in \boxed{}.""",
    r"""Task (about the figure): $question

Previous $what:
$response

Do not trust the previous $what. Study the image, solve the task from scratch and write the final answer in \boxed{}.""",
    r"""Below is a question about the image with a $what that needs checking.

$question

$What to check:
$response

Work through the problem yourself, using the image, and give the correct final answer inside \boxed{}.""",
]

RETRY_TEXT = r"""Question:
$question

Your previous answer was: $answer
This answer is incorrect. Solve the problem again, carefully, and put your final answer in \boxed{}."""

RETRY_IMAGE = r"""Look at the image again.

Question:
$question

Your previous answer was: $answer
This answer is incorrect. Solve the problem again, checking what the image shows, and put your final answer in \boxed{}."""
