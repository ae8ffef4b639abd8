"""``rsna19 validate``: a bundle checked on a site's labelled studies or on CQ500 (:mod:`~rsna19.validation.run`),
with the reference (:mod:`~rsna19.validation.references`), the numbers and their intervals
(:mod:`~rsna19.validation.stats`), a site recalibration (:mod:`~rsna19.validation.recalibrate`) and the reports
(:mod:`~rsna19.validation.report`)."""
