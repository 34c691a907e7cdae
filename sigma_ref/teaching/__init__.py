"""The course as a teacher hands it out (course.py): exercises with hidden solutions, learner copies for a
class (`python -m sigma_ref release`), and the executed course as a static site (`python -m sigma_ref book`)."""
