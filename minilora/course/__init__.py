"""The course (docs/teaching.md): assignments, the property checks that grade them, the
grader, and the answer checks of the notebooks' exercises.
"""
