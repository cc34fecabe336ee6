/*
 * train/config_rewards.h - internal to train/config.c: grpo.rewards, a JSON list of reward programs
 *
 *     [{"name": "correct", "cmd": ["python3", "r.py"], "weight": 1.0, "timeout_s": 30}, ...]
 *
 * name and cmd are required, weight defaults to 1, timeout_s to grpo.reward_timeout_s (stored as 0).
 */
#ifndef MOE_TRAIN_CONFIG_REWARDS_H
#define MOE_TRAIN_CONFIG_REWARDS_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

#include "train/config.h"

/*
 * Replaces g's list with the JSON array v.  Returns 0, or -1 with msg saying what is wrong, starting
 * with the entry and member when the fault is in one ("[1].weight: expected a number, got string");
 * g is unchanged then.
 */
int config_rewards_set(struct grpo_config *g, const cJSON *v, char *msg, size_t msglen);

/* The list as config_rewards_set reads it (NULL when out of memory). */
cJSON *config_rewards_json(const struct grpo_config *g);

bool config_rewards_equal(const struct grpo_config *a, const struct grpo_config *b);

/* The checks that tie the list to other keys (names unique, not with grpo.reward_cmd); 0 or -1 with err
 * naming the key. */
int config_rewards_validate(const struct grpo_config *g, char *err, size_t errlen);

#endif
