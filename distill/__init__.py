"""The ML core, framework-free: students, teachers, losses, the teacher-logit cache, training and evaluation."""
