/* A spinner for workers/awake.py: loops until *stop is set, with the CPU's pause hint between
 * reads. Called through ctypes, which releases the GIL for the call, from a thread the caller has
 * put at SCHED_IDLE: it only ever runs when nothing else wants the core, and keeps the core from
 * halting (a halted virtual CPU takes a VM exit to wake). */

#include <stdint.h>

void ew_idle_spin(volatile int32_t *stop) {
  while (!*stop) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
  }
}
