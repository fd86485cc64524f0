/* The CPU-bound benchmark: no host calls in the hot loop, so the runtime around the guest should
 * cost nothing. Sieve of Eratosthenes plus an integer hash mix, ROUNDS times.
 * usage: cpu_loop ROUNDS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LIMIT 2000000

static unsigned char composite[LIMIT];

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 10;
    uint64_t checksum = 0;
    for (int round = 0; round < rounds; round++) {
        memset(composite, 0, sizeof composite);
        uint32_t primes = 0;
        for (uint32_t i = 2; i < LIMIT; i++) {
            if (composite[i]) continue;
            primes++;
            checksum = (checksum ^ i) * 0x100000001b3ULL;
            for (uint64_t j = (uint64_t)i * i; j < LIMIT; j += i) composite[j] = 1;
        }
        checksum += primes;
    }
    printf("%llu\n", (unsigned long long)checksum);
    return 0;
}
