"""The course as a teacher hands it out (course.py): exercises with hidden solutions, learner copies for a
class (`python -m sigma_ref release`), the executed course as a static site (`python -m sigma_ref book`), and
Colab / Binder launching once it is published (`python -m sigma_ref publish`, launch.py)."""
