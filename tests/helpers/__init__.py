"""What several test files share: inputs, tolerances, references and small data sets.

Test files import from here and never from ``conftest`` or from one another, so that each test file
reads on its own and moving a test does not break another.
"""
