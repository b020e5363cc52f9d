// Placeholder until the run-time instruction-set dispatch lands: one variant, the build's.
#pragma once
#define FASTNN_ISA_BEGIN
#define FASTNN_ISA_END
#define FASTNN_ISA_DECLARE(Table, fn) const Table& fn();
#define FASTNN_ISA_SELECT(fn) fn()
